"""The synthetic world: generator determinism, record format, tokenizer, bundled model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mke_plugins import world
from mke_plugins.world.build import build, make_split
from mke_plugins.world.spec import CITY_COUNTRY, make_world

SMALL = dict(n_entities=12, n_edits=20)
STRING_FIELDS = ("src", "rephrase", "pred", "alt", "image", "image_rephrase", "loc", "loc_ans",
                 "m_loc", "m_loc_q", "m_loc_a", "text_only_prompt", "image_only_prompt")


def _tree_bytes(d: Path) -> dict[str, bytes]:
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


@pytest.fixture(scope="module")
def small_world(tmp_path_factory) -> Path:
    return build(tmp_path_factory.mktemp("w") / "a", seed=3, **SMALL)


def test_build_is_bit_identical_for_a_seed_and_differs_across_seeds(small_world, tmp_path):
    again = build(tmp_path / "b", seed=3, **SMALL)
    other = build(tmp_path / "c", seed=4, **SMALL)
    a, b, c = _tree_bytes(small_world), _tree_bytes(again), _tree_bytes(other)
    assert a == b
    assert a["edit.json"] != c["edit.json"]
    shared = set(a) & set(c) - {"edit.json", "train.json", "world.json"}
    assert any(a[k] != c[k] for k in shared) or set(a) != set(c)


def test_edit_records_have_every_field_and_their_images(small_world):
    recs = json.loads((small_world / "edit.json").read_text())
    assert len(recs) == SMALL["n_edits"]
    w = make_world(3, SMALL["n_entities"])
    names = {e.name: e for e in w.entities}
    for r in recs:
        for key in STRING_FIELDS:  # VQADataset drops records with an empty string field
            assert isinstance(r[key], str) and r[key], key
        for key in ("image", "image_rephrase", "m_loc"):
            assert (small_world / r[key]).is_file(), r[key]
            assert not Path(r[key]).is_absolute()
        ent = names[r["entity"]]
        assert r["pred"] == ent.facts[r["relation"]] != r["alt"]
        assert r["alt"] in w.relation(r["relation"]).objects
        assert ent.name in r["src"] and ent.name in r["rephrase"] and r["src"] != r["rephrase"]
        assert ent.name not in r["image_only_prompt"] and ent.name not in r["loc"]
        assert r["image"] != r["image_rephrase"]
        assert r["fine_locality"] and all(x["answer"] for x in r["fine_locality"])
        for x in r["fine_locality"] + r["portability"]:
            assert ("image" in x) == (x["form"] != "text")
        if r["relation"] == "lives_in":
            assert CITY_COUNTRY[r["alt"]] != CITY_COUNTRY[r["pred"]]
            assert {x["answer"] for x in r["portability"]} == {CITY_COUNTRY[r["alt"]]}
        else:
            assert r["portability"] == []


def test_train_split_never_holds_an_edited_fact(small_world):
    edit = json.loads((small_world / "edit.json").read_text())
    train = json.loads((small_world / "train.json").read_text())
    edited = {(r["entity"], r["relation"]) for r in edit}
    assert train and not edited & {(r["entity"], r["relation"]) for r in train}
    w = make_world(3, SMALL["n_entities"])
    split = make_split(w, SMALL["n_edits"])
    port = {w.entities[e].name for e in split.portability_entities}
    assert port == {r["entity"] for r in edit if r["relation"] == "lives_in"}


def test_tokenizer_round_trips_chat_and_makes_answers_one_token():
    from mke_plugins.world.modeling import build_processor, build_tokenizer

    w = make_world()
    proc = build_processor(build_tokenizer(w.vocabulary()))
    tok = proc.tokenizer
    chat = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True, tokenize=False)
    assert chat == ("<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What is this?"
                    "<|im_end|>\n<|im_start|>assistant\n")
    toks = tok.convert_ids_to_tokens(tok(chat + "wood").input_ids)
    assert toks == ["<|im_start|>", "user", "<|vision_start|>", "<|image_pad|>", "<|vision_end|>",
                    "What", "is", "this", "?", "<|im_end|>", "<|im_start|>", "assistant", "wood"]
    for r in w.relations:
        for o in r.objects:
            ids = tok(o, add_special_tokens=False).input_ids
            assert len(ids) == 1 and ids[0] != tok.unk_token_id
            assert tok(" " + o, add_special_tokens=False).input_ids == ids
    assert tok("Question: a, b.", add_special_tokens=False).input_ids.count(tok.unk_token_id) == 1


def test_fast_encoder_matches_the_processor():
    from mke_plugins.world.data import Encoder, Item, check_against_processor
    from mke_plugins.world.modeling import build_processor, build_tokenizer
    from mke_plugins.world.queries import Question

    w = make_world()
    enc = Encoder(w, build_processor(build_tokenizer(w.vocabulary())))
    items = [Item(Question("paired", 3, "eats", 1), 5), Item(Question("text", 3, "eats", 2), None),
             Item(Question("image", 7, "country", 0), 100), Item(Question("ident", 9, None, 0, True), 600)]
    check_against_processor(enc, items)


def test_records_give_qwen_native_images(small_world):
    from PIL import Image

    recs = world.records("edit", small_world)
    paths = world.record_paths("train", small_world)
    r = recs[0]
    for key in ("prompt", "target", "pred", "rephrase_prompt", "locality_prompt",
                "locality_ground_truth", "multimodal_locality_prompt",
                "multimodal_locality_ground_truth", "text_only_prompt", "image_only_prompt"):
        assert isinstance(r[key], str) and r[key]
    for key in ("image", "image_rephrase", "multimodal_locality_image"):
        assert isinstance(r[key], list) and len(r[key]) == 1
        assert isinstance(r[key][0], Image.Image) and r[key][0].mode == "RGB"
        assert r[key][0].size == (56, 56)
    assert r["file_type"] == "image"
    assert all(x["image"] is None or isinstance(x["image"][0], Image.Image) for x in r["fine_locality"])
    assert Path(paths[0]["image"]).is_absolute() and Path(paths[0]["image"]).is_file()


def test_bundled_model_loads_offline_and_runs(monkeypatch):
    import torch

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    path = world.model_path()
    assert "qwen2-vl" in path.name
    model, proc = world.load()
    from mke_plugins.world.render import render

    w = make_world()
    img = render(w.seed, w.entities[0], 0)
    chat = proc.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is this?"}]}],
        add_generation_prompt=True, tokenize=False)
    inputs = proc(images=[img], text=[chat], return_tensors="pt")
    with torch.no_grad():
        logits = model(**inputs).logits
    assert logits.shape[:2] == inputs["input_ids"].shape and torch.isfinite(logits).all()
    size = sum(p.stat().st_size for p in path.iterdir())
    assert size < 10_000_000


@pytest.mark.slow
def test_bundled_model_meets_the_quality_floor_on_a_subsample():
    import torch

    from mke_plugins.world.check import run_check

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # OpenMP threads fighting other processes run 10x slower
    try:
        model, proc = world.load()
        report = run_check(model, proc, make_world(), n=96)
    finally:
        torch.set_num_threads(threads)
    assert report["floor_met"], report["failures"]


def test_training_is_deterministic_for_a_seed(tmp_path):
    import torch

    from mke_plugins.world.train import train

    threads = torch.get_num_threads()
    try:
        for name in ("a", "b"):
            train(tmp_path / name, steps=3, batch_size=8, warmup=2, eval_every=0, threads=1,
                  log=lambda s: None, check=False)
    finally:
        torch.set_num_threads(threads)
    a, b = (tmp_path / n / "model.safetensors" for n in ("a", "b"))
    assert a.read_bytes() == b.read_bytes()
    assert (tmp_path / "a" / "tokenizer.json").read_bytes() == (tmp_path / "b" / "tokenizer.json").read_bytes()


def test_form_weights_parse_and_refuse_what_cannot_be_trained():
    from mke_plugins.world.train import FORM_WEIGHTS, form_weights

    assert form_weights(None) == FORM_WEIGHTS
    assert list(form_weights("paired=0.25, ident=1")) == list(FORM_WEIGHTS)  # order kept: same batches
    assert form_weights("paired=0.25, ident=1") == {"paired": 0.25, "text": 1, "image": 2, "ident": 1.0}
    for bad, says in [("paired", "FORM=WEIGHT"), ("paired=x", "FORM=WEIGHT"), ("pared=1", "unknown query forms"),
                      ("text=-1", ">= 0"), ("paired=0,text=0,image=0,ident=0", "not all 0")]:
        with pytest.raises(ValueError, match=says):
            form_weights(bad)


def test_variant_training_uses_its_form_mix_and_depth(tmp_path, capsys):
    import torch

    from mke_plugins.cli import main
    from mke_plugins.world.train import sample_batch, train

    w = make_world()
    items = sample_batch(w, make_split(w), 0, 0, 64, weights={"paired": 0, "text": 1, "image": 0, "ident": 0})
    assert {it.question.form for it in items} == {"text"}
    threads = torch.get_num_threads()
    try:
        meta = train(tmp_path / "v-qwen2-vl", steps=2, batch_size=8, warmup=1, eval_every=0, threads=1,
                     log=lambda s: None, check=False, forms="paired=0.25", n_layers=2)
    finally:
        torch.set_num_threads(threads)
    assert meta["decoder_layers"] == 2 and meta["form_weights"]["paired"] == 0.25
    cfg = json.loads((tmp_path / "v-qwen2-vl" / "config.json").read_text())
    assert cfg["text_config"]["num_hidden_layers"] == 2
    assert main(["world", "train", "--forms", "pared=1", "--out", str(tmp_path / "x")]) == 2
    assert "unknown query forms ['pared']" in capsys.readouterr().err
    assert main(["world", "train", "--layers", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
    with pytest.raises(ValueError, match="--layers 0"):  # the check lives in train(), not only the CLI
        train(tmp_path / "y", steps=1, n_layers=0, log=lambda s: None, check=False)
    assert not (tmp_path / "y").exists()
