"""`mke-plugins scale`: one timed edit on a random-init model built from a published config.

The 7B sizes run on a GPU machine (or slowly on a big CPU); here the command's own ``test`` size
exercises the same path: config, processor with Qwen-VL's pixel bounds, scaled world case,
apply, restore and the digest check.
"""

from __future__ import annotations

import json

import pytest

from mke_hooks import MKEError
from mke_plugins.bench import scale
from mke_plugins.cli import main


@pytest.fixture(scope="module")
def tiny_tok(tmp_path_factory):
    from mke_plugins.adapters.processors import load_processor
    from mke_plugins.testing.tiny import build_tiny

    return load_processor(build_tiny("qwen2-vl", tmp_path_factory.mktemp("scale-tok"))).tokenizer


@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl"])
def test_7b_config_has_the_published_shapes(family, tiny_tok):
    cfg, _ = scale._config(family, "7b", tiny_tok)
    text = cfg.text_config
    assert (text.vocab_size, text.hidden_size, text.intermediate_size, text.num_hidden_layers,
            text.num_attention_heads, text.num_key_value_heads) == (152064, 3584, 18944, 28, 28, 4)
    assert cfg.image_token_id == tiny_tok.convert_tokens_to_ids("<|image_pad|>")
    assert cfg.vision_config.depth == 32


@pytest.mark.parametrize("family,size,billions", [("qwen2-vl", "7b", 8.29), ("qwen2-vl", "2b", 2.21),
                                                   ("qwen2.5-vl", "7b", 8.29)])
def test_sizes_have_the_published_parameter_counts(family, size, billions, tiny_tok):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration, Qwen2VLForConditionalGeneration

    cfg, cls = scale._config(family, size, tiny_tok)
    assert cls is (Qwen2_5_VLForConditionalGeneration if family == "qwen2.5-vl" else Qwen2VLForConditionalGeneration)
    with torch.device("meta"):  # shapes only, no memory
        model = cls._from_config(cfg, dtype=torch.bfloat16)
    assert round(sum(p.numel() for p in model.parameters()) / 1e9, 2) == billions


def test_unknown_size_and_family_are_named(tiny_tok):
    with pytest.raises(MKEError, match=r"--size '13b'.*choose one of \['2b', '7b', 'test'\]"):
        scale._config("qwen2-vl", "13b", tiny_tok)
    with pytest.raises(MKEError, match="--family 'llava'"):
        scale._config("llava", "7b", tiny_tok)


def test_an_offline_stage_scale_cannot_stand_in_for_is_refused(monkeypatch):
    from mke_plugins.bench import scale_prep

    monkeypatch.delitem(scale_prep.PREPARERS, "LDKE")
    with pytest.raises(MKEError, match="LDKE has an offline stage, and scale knows no untrained stand-in"):
        scale.run_scale("LDKE", size="test")


def test_scale_runs_decode_and_ft_and_restores_bit_exactly(tmp_path):
    out = tmp_path / "scale.json"
    rc = main(["scale", "--methods", "DECODE[max_steps=2],FT[layer=2,max_steps=2]", "--size", "test",
               "--image-size", "112", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["decoder_layers"] == 4 and report["image_tokens"] == 16  # 112 px = 4 x 4 merged patches
    assert report["forward_seconds"] > 0 and report["fwdbwd_seconds"] > 0 and report["unit"] == "fwd+bwd"
    decode = report["methods"]["DECODE[max_steps=2]"]
    assert decode["restore_bit_exact"] is True
    assert decode["stats"]["steps_text"] <= 2 and decode["stats"]["steps_image"] <= 2
    assert decode["hparams"]["topk_per_token"] == 40  # the 7B YAML, not the world's
    assert decode["edit_seconds"] > 0 and decode["peak_memory_mb"] > 0
    # the cap came from the override; the full count from the 7B YAML's max_steps (200 per stage)
    assert (decode["step_field"], decode["step_cap"], decode["full_step_cap"]) == ("max_steps", 2, 200)
    assert decode["full_steps"] == decode["steps"] * 100
    assert decode["full_edit_seconds_est"] == pytest.approx(decode["seconds_per_step"] * decode["full_steps"])
    assert decode["ratio"] == pytest.approx(decode["edit_seconds"] / report["fwdbwd_seconds"])
    assert report["methods"]["FT[layer=2,max_steps=2]"]["restore_bit_exact"] is True


def test_scale_times_every_registered_method_with_stand_ins_for_offline_stages(tmp_path):
    """Every registered method (third-party plugins too) is timed under one --max-steps cap, those with
    an offline stage on an untrained stand-in, and each restore is bit-exact."""
    from mke_plugins.hparams import load_hparams
    from mke_plugins.registry import get_registry

    names = get_registry().names()
    assert {"ASAM", "DECODE", "LDKE", "UniKE", "FT", "LoRA"} <= set(names)
    methods = ",".join("ASAM[memory_size=4]" if n == "ASAM" else n for n in names)
    out = tmp_path / "scale.json"
    rc = main(["scale", "--methods", methods, "--size", "test", "--dtype", "float32", "--image-size", "56",
               "--hparams", "world", "--max-steps", "1", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    rows = report["methods"]
    assert len(rows) == len(names)
    for label, row in rows.items():
        assert row["restore_bit_exact"] is True, label
        assert row["step_cap"] == 1 and 1 <= row["steps"] <= 2, label  # DECODE: two stages
        assert row["edit_seconds"] > 0 and row["seconds_per_step"] > 0 and row["full_ratio_est"] > 0, label
    assert rows["LDKE"]["hparams"]["classifier_archive"].endswith("ldke-untrained.pt")
    assert "untrained" in rows["LDKE"]["prepared"]["note"]
    assert rows["UniKE"]["hparams"]["archive"].endswith("unike-untrained.pt")
    assert "untrained" in rows["UniKE"]["prepared"]["note"]
    asam = rows["ASAM[memory_size=4]"]
    assert asam["prepared"]["note"].startswith("memory bank built")
    assert asam["stats"]["memory_source"] == "memory"  # built before the timed edit, read inside it
    assert rows["UniKE"]["full_step_cap"] == load_hparams("UniKE", "world").max_edit_steps  # the uncapped YAML


def test_untrained_archives_have_the_models_shapes(tmp_path):
    """The stand-ins are built through the methods' own code and pass their own archive checks."""
    from mke_plugins.adapters import get_adapter
    from mke_plugins.adapters.base import Query
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.ldke.ldke_hparams import LDKETrainingHyperParams
    from mke_plugins.methods.ldke.ldke_train import untrained_archive as ldke_untrained
    from mke_plugins.methods.ldke.router import check_fingerprint, fingerprint, load_archive
    from mke_plugins.methods.unike.archive import load_archive as unike_load
    from mke_plugins.methods.unike.unike_hparams import UniKETrainingHparams
    from mke_plugins.methods.unike.unike_train import untrained_archive as unike_untrained

    model, proc = scale.build_random_model("qwen2-vl", "test", device="cpu", dtype="float32", seed=0,
                                           workdir=tmp_path)
    hp = load_hparams("LDKE", "world")
    adapter = get_adapter(model, hp)
    train = LDKETrainingHyperParams.from_config({"feature_layer": 2, "seed": 3})
    ldke_untrained(train, model=model, out=tmp_path / "l.pt")
    archive = load_archive(tmp_path / "l.pt")
    check_fingerprint(archive, fingerprint(adapter, model, 2, "hidden"))
    assert archive["meta"]["untrained"] is True and archive["tau"] == 0.5
    assert archive["mu"].tolist() == pytest.approx([0.25] * 4)
    utrain = UniKETrainingHparams.from_config({"layers": [-2, -1], "tru_dim": 8})
    queries = [Query(None, "The capital of Zorbia is", "Quux"), Query(None, "Blue is a", "colour")]
    path = unike_untrained(utrain, model, proc, queries, tmp_path / "u.pt")
    loaded = unike_load(path, model, adapter, [2, 3])
    assert loaded.meta["split"] == "untrained" and 1 <= int(loaded.payload["bank.h_sem"].shape[0]) <= 2
    assert loaded.d_t == 8 and tuple(loaded.payload["w_zeta"].shape[1:]) == (loaded.d, 8)


def test_digests_see_a_one_bit_change():
    import torch

    lin = torch.nn.Linear(3, 2)
    before = scale.param_digests(lin)
    with torch.no_grad():
        w = lin.weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
    assert scale.param_digests(lin) != before


@pytest.mark.parametrize("drop", [True, False])
def test_the_fwd_bwd_unit_can_free_each_weight_gradient_as_it_is_made(monkeypatch, drop):
    """``drop_grads`` (scale's unit): no weight holds a gradient once the backward pass is over."""
    import torch

    from mke_plugins.bench import cost

    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 1))
    held = []

    class Adapter:
        def loss(self, model, batch):
            return model(batch).sum()

    def after_pass(device):  # cost.sync runs right after each backward
        held.append([p.grad is not None for p in model.parameters()])

    monkeypatch.setattr(cost, "sync", after_pass)
    cost.fwd_bwd_seconds(Adapter(), model, torch.ones(2, 3), warmup=0, repeats=1, drop_grads=drop)
    assert held[-1] == [not drop] * 4
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
