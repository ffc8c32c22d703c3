"""Adapters on every family's tiny model: detection, inputs, accessors, masks, exact restore.

Inputs are compared with EasyEdit's own builder in ``test_adapters_easyedit.py``; here the
adapter is checked for self-consistency (batched rows equal single rows, masks agree, module
names are the family's real ones) and the core edit/restore cycle runs on each family.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mke_hooks.errors import RequestError
from mke_plugins.adapters import Query, get_adapter, supported_families
from mke_plugins.core.hooks import capture, hook_counts, intervene
from mke_plugins.core.snapshot import RestoreHandle, WeightSnapshot, assert_same_state, state_of
from mke_plugins.testing.images import make_image, native_image

HF = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision"]
LAVIS = ["blip2", "minigpt4"]
ALL = HF + LAVIS
ADAPTER_FAMILY = {"qwen2.5-vl": "qwen2-vl"}

#: per family: (layer path prefix, value suffix, key suffixes, final norm, lm_head)
NAMES = {
    "qwen2-vl": ("model.language_model.layers", "mlp.down_proj", ["mlp.gate_proj", "mlp.up_proj"],
                 "model.language_model.norm", "lm_head"),
    "qwen3-vl": ("model.language_model.layers", "mlp.down_proj", ["mlp.gate_proj", "mlp.up_proj"],
                 "model.language_model.norm", "lm_head"),
    "llava-onevision": ("model.language_model.layers", "mlp.down_proj", ["mlp.gate_proj", "mlp.up_proj"],
                        "model.language_model.norm", "lm_head"),
    "blip2": ("opt_model.model.decoder.layers", "fc2", ["fc1"], "opt_model.model.decoder.final_layer_norm",
              "opt_model.lm_head"),
    "minigpt4": ("llama_model.model.layers", "mlp.down_proj", ["mlp.gate_proj", "mlp.up_proj"],
                 "llama_model.model.norm", "llama_model.lm_head"),
}
NAMES["qwen2.5-vl"] = NAMES["qwen2-vl"]


@pytest.fixture
def setup(request, family_model):
    """``setup(family)`` -> (model, tok, adapter, hparams)."""

    def make(family: str):
        model, tok, name = family_model(family)
        hp = SimpleNamespace(model_name=name)
        return model, tok, get_adapter(model, hp), hp

    return make


def queries(family: str) -> list[Query]:
    return [Query(native_image(family, 0), "What is in the picture?", "a red circle"),
            Query(None, "The capital of Italy is", "Rome"),
            Query(native_image(family, 3), "Which city is shown?", "Paris")]


@pytest.mark.parametrize("family", ALL)
def test_detection_by_name_model_and_tuple(family, setup):
    model, tok, adapter, hp = setup(family)
    want = ADAPTER_FAMILY.get(family, family)
    assert adapter.family == want
    assert get_adapter(model).family == want  # from the model alone
    assert get_adapter(model, SimpleNamespace(model_name=(model, tok))).family == want  # tuple mode
    assert get_adapter(model, SimpleNamespace(model_name="/some/where/unmarked")).family == want


def test_detection_names_and_unknown():
    names = {"/m/Qwen2-VL-7B-Instruct": "qwen2-vl", "qwen2.5-vl-3b": "qwen2-vl", "Qwen2_5_VL": "qwen2-vl",
             "hf/Qwen3-VL-8B": "qwen3-vl", "llava-hf/llava-onevision-qwen2-0.5b-ov-hf": "llava-onevision",
             "blip2": "blip2", "minigpt4": "minigpt4"}
    for name, fam in names.items():
        assert get_adapter(None, SimpleNamespace(model_name=name)).family == fam, name
    with pytest.raises(ValueError) as err:
        get_adapter(torch.nn.Linear(2, 2), SimpleNamespace(model_name="gpt2"))
    for fam in supported_families():
        assert fam in str(err.value)


@pytest.mark.parametrize("family", ALL)
def test_accessors_name_the_real_modules(family, setup):
    model, tok, adapter, _ = setup(family)
    names = {id(m): n for n, m in model.named_modules()}
    prefix, value, keys, norm, head = NAMES[family]
    layers = adapter.layers(model)
    assert len(layers) == 4
    for i, info in enumerate(layers):
        assert info.index == i and info.name == f"{prefix}.{i}" and names[id(info.layer)] == info.name
        assert names[id(info.value)] == f"{prefix}.{i}.{value}" == info.value_name
        assert [names[id(k)] for k in info.keys] == [f"{prefix}.{i}.{k}" for k in keys]
        assert names[id(info.attn)] == f"{prefix}.{i}.self_attn"
        assert info.gated == (len(keys) == 2)
        assert info.value.weight.shape[1] == info.keys[0].weight.shape[0]
        assert names[id(info.value_in.module)] == info.value_name and info.value_in.where == "input"
    assert names[id(adapter.final_norm(model))] == norm
    assert names[id(adapter.lm_head(model))] == head
    emb = adapter.embed_output(model)
    assert emb.module is layers[0].layer and emb.where == "input"


@pytest.mark.parametrize("family", ALL)
def test_batch_rows_equal_single_rows_and_masks(family, setup):
    model, tok, adapter, _ = setup(family)
    qs = queries(family)
    for eos in (False, True):
        batch = adapter.batch(model, tok, qs, append_eos=eos)
        assert len(batch) == 3 and batch.labels.shape == batch.attention_mask.shape == batch.image_mask.shape
        with torch.no_grad():
            logits = adapter.forward(model, batch)
        assert logits.shape[:2] == batch.labels.shape
        for i, q in enumerate(qs):
            one = adapter.batch(model, tok, [q], append_eos=eos)
            n = one.labels.shape[1]
            rows = batch.attention_mask[i].bool()
            assert torch.equal(batch.labels[i][rows], one.labels[0]), (family, i)
            assert torch.equal(batch.image_mask[i][rows], one.image_mask[0])
            with torch.no_grad():
                lg1 = adapter.forward(model, one)
            torch.testing.assert_close(logits[i][rows], lg1[0], atol=1e-4, rtol=1e-4)
            assert n == int(rows.sum())
            # the target sits right after the prompt; the label span is the tokenised target (+ EOS)
            tgt = one.labels[0][one.labels[0] != -100].tolist()
            if eos:
                assert tgt[-1] == adapter.eos_token_id(tok)
        assert (batch.image_mask.sum(1) > 0).tolist() == [True, False, True]
        assert not (batch.prompt_mask & batch.target_mask).any()
        assert (batch.answer_mask.sum(1) == batch.target_mask.sum(1)).all()
    pm = adapter.prompt_mask_from_inputs(tok, batch.inputs, model=model)
    assert torch.equal(pm, batch.prompt_mask)


@pytest.mark.parametrize("family", ALL)
def test_loss_accuracy_and_success(family, setup):
    model, tok, adapter, _ = setup(family)
    batch = adapter.batch(model, tok, queries(family))
    with torch.no_grad():
        logits = adapter.forward(model, batch)
    loss = adapter.loss(model, batch, logits)
    rows = adapter.loss(model, batch, logits, reduction="row")
    assert loss.dtype == torch.float32 and torch.isfinite(loss) and rows.shape == (3,)
    # forcing the argmax to the labels gives accuracy 1 and success everywhere
    forced = torch.full_like(logits, -10.0)
    tgt = batch.labels[:, 1:]
    for b, t in zip(*torch.nonzero(tgt != -100, as_tuple=True), strict=True):
        forced[b, t, tgt[b, t]] = 10.0
    assert adapter.token_accuracy(forced, batch).tolist() == [1.0, 1.0, 1.0]
    assert adapter.success(forced, batch).all()
    forced[0, int(batch.answer_positions()[0][0])] = 0.0
    forced[0, int(batch.answer_positions()[0][0]), 0] = 10.0
    acc = adapter.token_accuracy(forced, batch)
    n0 = len(batch.answer_positions()[0])
    assert acc[0].item() == pytest.approx((n0 - 1) / n0) and adapter.success(forced, batch).tolist() == [False,
                                                                                                          True, True]


@pytest.mark.parametrize("family", ALL)
def test_generate_returns_text(family, setup):
    model, tok, adapter, _ = setup(family)
    out = adapter.generate(model, tok, queries(family)[0], max_new_tokens=3)
    assert isinstance(out, str)


@pytest.mark.parametrize("family", ALL)
def test_wrong_image_type_names_the_field(family, setup):
    model, tok, adapter, _ = setup(family)
    bad = "not-an-image.jpg"
    with pytest.raises(RequestError) as err:
        adapter.batch(model, tok, [Query(bad, "q?", "a")])
    assert "image" in str(err.value) and ("PIL" in str(err.value) or "tensor" in str(err.value))
    assert isinstance(err.value, ValueError)
    if family in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl"):  # a single PIL image is accepted and wrapped
        b1 = adapter.batch(model, tok, [Query(make_image(0), "q?", "a")])
        b2 = adapter.batch(model, tok, [Query([make_image(0)], "q?", "a")])
        assert torch.equal(b1.inputs["input_ids"], b2.inputs["input_ids"])
    if family == "llava-onevision":
        with pytest.raises(RequestError, match="PIL"):
            adapter.batch(model, tok, [Query([make_image(0)], "q?", "a")])
    if family in LAVIS:
        with pytest.raises(RequestError, match="float tensor"):
            adapter.batch(model, tok, [Query(make_image(0), "q?", "a")])


@pytest.mark.parametrize("family", ALL)
def test_value_column_delta_restores_bit_exactly(family, setup):
    model, tok, adapter, _ = setup(family)
    batch = adapter.batch(model, tok, queries(family)[:1])
    before = state_of(model)
    with torch.no_grad():
        base = adapter.forward(model, batch)
    counts = hook_counts(model)  # after a first forward: transformers installs some hooks lazily
    info = adapter.layers(model)[1]
    snap = WeightSnapshot(model).add(info.value_name + ".weight", columns=[3])
    handle = RestoreHandle([snap])
    with torch.no_grad():
        info.value.weight[:, 3] += 0.5
        edited = adapter.forward(model, batch)
    assert not torch.equal(base, edited)
    assert list(handle.items()) == []  # EasyEdit's default restore path
    assert_same_state(before, model)
    handle()  # idempotent
    assert_same_state(before, model)
    # hooks are gone after an exception inside capture/intervene
    with pytest.raises(ZeroDivisionError):
        with capture({"emb": adapter.embed_output(model), "v": info.value_in}) as rec, \
                intervene(info.ffn_out, lambda x: x * 2):
            with torch.no_grad():
                adapter.forward(model, batch)
            assert rec["emb"].shape[0] == 1
            raise ZeroDivisionError("an exception inside capture/intervene")
    assert hook_counts(model) == counts
    with torch.no_grad():
        assert torch.equal(adapter.forward(model, batch), base)


@pytest.mark.parametrize("family", ["qwen2-vl", "blip2"])
def test_bf16_model_gets_model_dtype_inputs_and_exact_restore(family, setup):
    model, tok, adapter, _ = setup(family)
    model.to(torch.bfloat16)
    batch = adapter.batch(model, tok, queries(family)[:2])
    if family in HF:
        assert batch.inputs["pixel_values"].dtype == torch.bfloat16
        assert batch.inputs["input_ids"].dtype == torch.long
    before = state_of(model)
    info = adapter.layers(model)[0]
    handle = RestoreHandle([WeightSnapshot(model).add(info.value.weight, columns=[0, 5])])
    with torch.no_grad():
        info.value.weight[:, [0, 5]] += 0.01
        logits = adapter.forward(model, batch)
    assert logits.dtype == torch.bfloat16 and torch.isfinite(adapter.loss(model, batch, logits))
    handle()
    assert_same_state(before, model)


def test_normalize_requests_checks_image_types_with_the_adapter(setup):
    from mke_plugins.core.requests import normalize_requests

    model, tok, adapter, _ = setup("llava-onevision")
    good = {"prompt": "q?", "target": "a", "image": make_image(0)}
    assert len(normalize_requests(good, adapter)) == 1
    with pytest.raises(RequestError, match=r"request #1, field 'image_rephrase'.*PIL"):
        normalize_requests([good, {**good, "image_rephrase": torch.zeros(3, 4, 4)}], adapter)


# -- the shared helpers of adapters/base.py and adapters/loading.py -------------------------------
def test_resolve_layers_counts_from_the_top_and_names_the_field_on_errors():
    from mke_hooks import HparamsError
    from mke_plugins.adapters import resolve_layers

    assert resolve_layers([-1, 0, -2], 4) == [0, 2, 3]
    with pytest.raises(HparamsError, match="key 'edit_layers': entry 4 is out of range .* 4 decoder layers"):
        resolve_layers([4], 4, key="edit_layers")
    with pytest.raises(HparamsError, match=r"key 'layers': \[3, -1\] names the same layer twice"):
        resolve_layers([3, -1], 4)


def test_load_vlm_refuses_a_folder_it_cannot_load_with_the_fix(tmp_path):
    from mke_hooks import MKEError
    from mke_plugins.adapters.loading import load_vlm

    with pytest.raises(MKEError, match="--model .*: no config.json there; pass a saved Hugging Face model"):
        load_vlm(tmp_path)
    with pytest.raises(MKEError, match="model_name in x.yaml: blip2 is one of EasyEdit's LAVIS wrappers"):
        load_vlm("blip2", what="model_name in x.yaml")
    (tmp_path / "config.json").write_text('{"model_type": "qwen2_vl"}')
    with pytest.raises(MKEError, match="no weights there"):
        load_vlm(tmp_path)


def test_seed_all_seeds_python_numpy_and_torch():
    import random

    import numpy as np

    from mke_plugins.adapters.loading import seed_all

    seed_all(3)
    first = (random.random(), float(np.random.rand()), float(torch.rand(1)))
    seed_all(3)
    assert (random.random(), float(np.random.rand()), float(torch.rand(1))) == first
