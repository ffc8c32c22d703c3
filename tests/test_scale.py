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


def test_offline_methods_are_refused():
    with pytest.raises(MKEError, match="LDKE needs its offline stage's archive"):
        scale.run_scale("LDKE", size="test")


def test_scale_runs_decode_and_ft_and_restores_bit_exactly(tmp_path):
    out = tmp_path / "scale.json"
    rc = main(["scale", "--methods", "DECODE[max_steps=2],FT[layer=2,max_steps=2]", "--size", "test",
               "--image-size", "112", "--json", str(out)])
    assert rc == 0
    report = json.loads(out.read_text())
    assert report["decoder_layers"] == 4 and report["image_tokens"] == 16  # 112 px = 4 x 4 merged patches
    assert report["forward_seconds"] > 0
    decode = report["methods"]["DECODE[max_steps=2]"]
    assert decode["restore_bit_exact"] is True
    assert decode["stats"]["steps_text"] <= 2 and decode["stats"]["steps_image"] <= 2
    assert decode["hparams"]["topk_per_token"] == 40  # the 7B YAML, not the world's
    assert decode["edit_seconds"] > 0 and decode["peak_memory_mb"] > 0
    assert report["methods"]["FT[layer=2,max_steps=2]"]["restore_bit_exact"] is True


def test_digests_see_a_one_bit_change():
    import torch

    lin = torch.nn.Linear(3, 2)
    before = scale.param_digests(lin)
    with torch.no_grad():
        w = lin.weight.view(-1)
        w[0] = torch.nextafter(w[0], torch.tensor(float("inf")))
    assert scale.param_digests(lin) != before
