"""The benchmarks users have: every fixture loads, is detected, benches and trains; bad records fail first.

Fixtures (``tests/fixtures/benchmarks/<format>/``, drawn by ``make_benchmarks.py``) hold a few
records in each benchmark's published schema. Errors must name the file, the record index and
the benchmark's own field, and come before the model is edited.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from mke_hooks import MKEError
from mke_plugins.bench.data import load_data
from mke_plugins.cli import main

pytestmark = pytest.mark.usefixtures("one_thread")

B = Path(__file__).resolve().parent / "fixtures" / "benchmarks"
#: format -> (fixture folder, records file, root flags)
FIXTURES = {
    "mmedit-vqa": ("vqa_eval.json", ["--image-root", "coco", "--rephrase-image-root", "rephrase"]),
    "mmedit-caption": ("caption_eval_edit.json", ["--image-root", "coco", "--rephrase-image-root", "rephrase"]),
    "vlkeb": ("eval_multihop.json", ["--image-root", "mmkb_images"]),
    "mmke": ("eval.json", ["--image-root", "data_image"]),
    "comprehendedit": ("ComprehendEdit_test.json", []),
}


def _flags(fmt: str, folder: Path = B) -> list[str]:
    flags = FIXTURES[fmt][1]
    return [f if f.startswith("--") else str(folder / fmt / f) for f in flags]


def _load(name: str, folder: Path = B, **kw):
    """``name``'s fixture in ``folder`` read with its roots (``fmt`` defaults to auto)."""
    flags = _flags(name, folder)
    roots = {flags[i].lstrip("-").replace("-", "_"): flags[i + 1] for i in range(0, len(flags), 2)}
    return load_data(folder / name, **{**roots, **kw})


def _copy(tmp_path: Path, fmt: str) -> tuple[Path, list[dict]]:
    shutil.copytree(B / fmt, tmp_path / fmt)
    return tmp_path, json.loads((tmp_path / fmt / FIXTURES[fmt][0]).read_text())


def _rewrite(folder: Path, fmt: str, records: list) -> None:
    (folder / fmt / FIXTURES[fmt][0]).write_text(json.dumps(records))


# -- reading --------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_every_fixture_loads_and_is_detected(fmt):
    raw = json.loads((B / fmt / FIXTURES[fmt][0]).read_text())
    ds = _load(fmt)  # auto
    assert ds.format == fmt and len(ds.requests) == len(raw) == ds.record_index[-1] + 1
    assert ds.notes[0].startswith(f"--format auto: {FIXTURES[fmt][0]} read as {fmt} (")
    explicit = _load(fmt, fmt=fmt)
    assert explicit.requests == ds.requests and explicit.notes == []
    for req in ds.requests:
        assert req["prompt"] and req["target"] and Path(req["image"]).is_file()
        assert Path(req["multimodal_locality_image"]).is_file() and req["locality_ground_truth"]
        for item in req.get("portability", []):
            assert item["prompt"] and item["answer"] and Path(item["image"]).is_file() and item["form"].endswith("hop")


def test_each_loader_maps_its_benchmark_fields():
    vqa, cap = _load("mmedit-vqa").requests[0], _load("mmedit-caption").requests[0]
    assert vqa["prompt"].endswith("?") and vqa["image_rephrase"].startswith(str(B / "mmedit-vqa" / "rephrase"))
    assert cap["prompt"] == "a picture of" and "Question" not in cap["multimodal_locality_prompt"]
    vlkeb = _load("vlkeb").requests
    assert [len(r["portability"]) for r in vlkeb] == [1, 2, 1]
    assert vlkeb[1]["portability"][1]["form"] == "2-hop" and vlkeb[1]["portability"][1]["image"] == vlkeb[1]["image"]
    mmke = {r["knowledge_type"]: r for r in _load("mmke").requests}
    assert mmke["entity_level"]["portability"][0]["image"] == mmke["entity_level"]["image"]
    for kind in ("visual_knowledge", "user_specific"):  # asked with one_hop_img, as the benchmark does
        assert mmke[kind]["portability"][0]["image"].endswith("_2.png") != mmke[kind]["image"].endswith("_2.png")
    raw = json.loads((B / "comprehendedit" / "ComprehendEdit_test.json").read_text())
    ce = _load("comprehendedit").requests
    assert [r["locality_ground_truth"] for r in ce] == [r["locality_ground_truth"] for r in raw]
    assert all(r["locality_ground_truth"] != r["locality_prompt"] and "image_rephrase" not in r for r in ce)
    assert [r["prompt"] for r in ce] == [r["question"] for r in raw]


def test_roots_come_from_the_flags_else_the_hparams_else_the_json_folder():
    with pytest.raises(MKEError, match=r"record 0, field 'image'.*from the JSON's folder.*--image-root"):
        load_data(B / "mmedit-vqa", fmt="mmedit-vqa")
    hp = SimpleNamespace(alg_name="FT", coco_image=str(B / "mmedit-vqa" / "coco"),
                         rephrase_image=str(B / "mmedit-vqa" / "rephrase"))
    assert load_data(B / "mmedit-vqa", fmt="mmedit-vqa", hparams=[hp]).requests == _load("mmedit-vqa").requests
    with pytest.raises(MKEError, match=r"field 'image_rephrase'.*FT's hparams coco_image"):  # rephrase falls back
        load_data(B / "mmedit-vqa", fmt="mmedit-vqa", hparams=[SimpleNamespace(alg_name="FT",
                                                                               coco_image=hp.coco_image)])
    other = SimpleNamespace(alg_name="ASAM", coco_image="/elsewhere", rephrase_image="")
    with pytest.raises(MKEError, match="different coco_image roots.*FT:.*ASAM: /elsewhere.*--image-root"):
        load_data(B / "mmedit-vqa", fmt="mmedit-vqa", hparams=[hp, other])


def test_the_bench_takes_its_roots_from_the_methods_hparams_without_the_flags():
    from mke_plugins.bench.runner import Bench, BenchConfig, methods_from

    with pytest.raises(MKEError, match=r"record 0, field 'image'.*from FT's hparams coco_image.*--image-root"):
        Bench(BenchConfig(methods=methods_from("FT"), data=str(B / "mmedit-vqa"), progress=False))


def test_records_are_skipped_as_each_benchmark_loader_skips_them(tmp_path):
    folder, recs = _copy(tmp_path, "mmedit-vqa")
    recs[1]["loc_ans"], recs[2]["alt"] = "", ""
    _rewrite(folder, "mmedit-vqa", recs)
    vqa = _load("mmedit-vqa", folder, fmt="mmedit-vqa")  # any empty field: skipped
    assert vqa.record_index == [0] and "skipped 2 record(s) (1, 2)" in vqa.notes[0]
    cap = _load("mmedit-vqa", folder, fmt="mmedit-caption")  # only an empty alt: skipped; no T-Loc probe
    assert cap.record_index == [0, 1] and "locality_prompt" not in cap.requests[1]
    _rewrite(folder, "mmedit-vqa", [dict(r, alt="") for r in recs])
    with pytest.raises(MKEError, match="no record left to edit"):
        _load("mmedit-vqa", folder, fmt="mmedit-vqa")


@pytest.mark.parametrize("fmt, index, change, needles", [
    ("mmedit-vqa", 1, lambda r: r.pop("m_loc"), ["record 1: field 'm_loc' is missing"]),
    ("mmedit-caption", 2, lambda r: r.update(image=7), ["record 2: field 'image' must be a str"]),
    ("vlkeb", 2, lambda r: r.update(port_new=[{"port_type": "1-hop"}]), ["record 2: port_new[0] needs"]),
    ("mmke", 1, lambda r: r.update(knowledge_type="visual"), ["record 1: field 'knowledge_type'", "entity_level"]),
    ("mmke", 2, lambda r: r.pop("one_hop_img"), ["record 2: field 'one_hop_img' is missing"]),
    ("comprehendedit", 1, lambda r: r.update(image="GQA/images/none.png"), ["record 1, field 'image'", "none.png"]),
])
def test_a_broken_record_names_the_file_record_and_field(tmp_path, fmt, index, change, needles):
    folder, recs = _copy(tmp_path, fmt)
    change(recs[index])
    _rewrite(folder, fmt, recs)
    with pytest.raises(MKEError) as err:
        _load(fmt, folder, fmt=fmt)
    assert str(err.value).startswith(str(folder / fmt / FIXTURES[fmt][0]))
    for needle in needles:
        assert needle in str(err.value)


def test_detection_is_unambiguous_or_says_which_formats_matched(tmp_path):
    folder, recs = _copy(tmp_path, "mmke")
    _rewrite(folder, "mmke", [dict(recs[0], question="What?", answer="x", multimodal_locality_prompt="y")])
    with pytest.raises(MKEError, match=r"fits several formats \(mmke, comprehendedit\); pass --format"):
        _load("mmke", folder)
    _rewrite(folder, "mmke", [{"question": "What?"}])
    with pytest.raises(MKEError, match=r"record 0 \(fields question\) fits no known format.*pass --format"):
        _load("mmke", folder)
    with pytest.raises(MKEError, match="--format must be one of auto, world"):
        _load("mmke", folder, fmt="easyedit")


# -- the bench and the offline stages ---------------------------------------------------------------
def test_an_unspellable_word_names_the_benchmark_field_before_any_edit(tmp_path, capsys):
    folder, recs = _copy(tmp_path, "comprehendedit")
    recs[2]["question"] = "Welches Ding ist das?"
    _rewrite(folder, "comprehendedit", recs)
    argv = ["bench", "--methods", "FT", "--cases", "3", "--no-progress", "--plot", "",
            "--json", str(tmp_path / "r.json"), "--data", str(folder / "comprehendedit")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "record 2, field 'question'" in err and "'Welches'" in err and not (tmp_path / "r.json").exists()


def test_an_unreadable_picture_names_the_kept_record_and_the_benchmark_field(tmp_path):
    from mke_plugins.bench.runner import Bench, BenchConfig, methods_from

    folder, recs = _copy(tmp_path, "comprehendedit")
    recs[0]["answer"] = ""  # skipped: request 0 is record 1
    _rewrite(folder, "comprehendedit", recs)
    (folder / "comprehendedit" / recs[1]["multimodal_locality_image"]).write_text("not a picture")
    with pytest.raises(MKEError, match=r"record 1, field 'multimodal_locality_image'.*not a readable image"):
        Bench(BenchConfig(methods=methods_from("FT"), data=str(folder / "comprehendedit"), progress=False))


@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_every_fixture_benches_end_to_end(tmp_path, capsys, fmt):
    out = tmp_path / "r.json"
    argv = ["bench", "--methods", "FT", "--cases", "2", "--no-generate", "--no-progress", "--plot", "",
            "--json", str(out), "--data", str(B / fmt), *_flags(fmt)]
    assert main(argv) == 0, capsys.readouterr().err
    row = json.loads(out.read_text())["methods"]["FT"]
    assert row["n_cases"] == 2 and row["rewrite_acc"] is not None and row["multimodal_locality_acc"] is not None
    assert (row["portability_acc"] is not None) == (fmt in ("vlkeb", "mmke"))
    assert (row["image_rephrase_acc"] is None) == (fmt == "comprehendedit")
    assert row["text_only_acc"] is None and row["fine_locality_acc"] is None  # the world's extensions only


@pytest.mark.parametrize("fmt", list(FIXTURES))
def test_the_offline_stages_read_every_fixture(tmp_path, capsys, fmt):
    unike = tmp_path / "unike.yaml"
    text = (Path(__file__).resolve().parents[1] / "mke_plugins/methods/unike/hparams/training/world.yaml").read_text()
    unike.write_text(text.replace("enc_epochs: 50", "enc_epochs: 1").replace("patience: 50", "patience: 1")
                     .replace("bank_size: 2000", "bank_size: 20"))
    common = ["--data", str(B / fmt), "--format", fmt, *_flags(fmt), "--quiet"]
    assert main(["train", "UniKE", "--hparams", str(unike), "--out", str(tmp_path / "u.pt"), *common]) == 0, \
        capsys.readouterr().err
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["triplets"] > 0  # rows the model already answers are skipped by UniKE itself
    assert main(["train", "LDKE", "--max-epochs", "1", "--trainer", "standin", "--out", str(tmp_path / "l.pt"),
                 *common]) == 0, capsys.readouterr().err
    assert (tmp_path / "l.pt").is_file() and "wrote" in capsys.readouterr().out
