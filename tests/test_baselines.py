"""The FT and LoRA baselines: conformance kit, what they change, and their YAMLs for every family."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from mke_plugins.testing import parametrize_with_checks

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@parametrize_with_checks(["FT", "LoRA"])
def test_conformance(method, check):
    check(method)


@pytest.fixture(scope="module")
def world_case():
    from mke_plugins import world

    model, tok = world.load()
    return model, tok, world.records("edit")[:2]


def _success(model, tok, hparams, req) -> bool:
    from mke_plugins.adapters import Query, get_adapter

    ad = get_adapter(model, hparams)
    batch = ad.batch(model, tok, [Query(req["image"], req["prompt"], req["target"])])
    with torch.no_grad():
        return bool(ad.success(ad.forward(model, batch), batch)[0])


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_ft_changes_only_its_value_matrix_and_reaches_the_target(world_case):
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.ft.ft_main import apply_ft_to_multimodal_model

    model, tok, reqs = world_case
    model = copy.deepcopy(model)
    hp = load_hparams("FT", "world")
    before = _state(model)
    assert not _success(model, tok, hp, reqs[0])
    edited, wc = apply_ft_to_multimodal_model(model, tok, [reqs[0]], hp, return_orig_weights=True)
    assert edited is model and _success(model, tok, hp, reqs[0])
    changed = [n for n, p in model.named_parameters() if not torch.equal(p, before[n])]
    assert changed == [wc.stats.flat()["param"]] and changed[0].endswith("mlp.down_proj.weight")
    assert 0 < wc.stats.flat()["steps"] <= hp.max_steps and wc.stats.converged is True
    assert list(wc.items()) == []  # EasyEdit's default branch: items() restores and yields nothing
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_ft_norm_constraint_bounds_the_change(world_case):
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.ft.ft_main import apply_ft_to_multimodal_model

    model, tok, reqs = world_case
    model = copy.deepcopy(model)
    hp = load_hparams("FT", "world", norm_constraint=1e-3, max_steps=5)
    before = _state(model)
    _, wc = apply_ft_to_multimodal_model(model, tok, [reqs[0]], hp, return_orig_weights=True)
    name = wc.stats.flat()["param"]
    delta = (model.get_parameter(name) - before[name]).abs().max().item()
    assert 0 < delta <= 1e-3 + 1e-7
    wc()


def test_lora_adds_adapters_and_unloads_them_on_restore(world_case):
    from peft.tuners.lora.layer import LoraLayer

    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.lora.lora_main import apply_lora_to_multimodal_model

    model, tok, reqs = world_case
    model = copy.deepcopy(model)
    hp = load_hparams("LoRA", "world")
    modules = [n for n, _ in model.named_modules()]
    before = _state(model)
    edited, wc1 = apply_lora_to_multimodal_model(model, tok, [reqs[0]], hp, return_orig_weights=True)
    lora = [n for n, m in model.named_modules() if isinstance(m, LoraLayer)]
    assert len(lora) == len(hp.layers) * len(hp.target_modules)
    assert all(n.split(".")[-1] in hp.target_modules for n in lora)
    assert _success(model, tok, hp, reqs[0]) and wc1.stats.flat()["new_adapters"] == len(lora)
    # a second edit keeps training the same adapters; its restore returns to the first edit's state
    first = _state(model)
    _, wc2 = apply_lora_to_multimodal_model(model, tok, [reqs[1]], hp, return_orig_weights=True)
    assert wc2.stats.flat()["new_adapters"] == 0
    list(wc2.items())
    assert all(torch.equal(p, first[n]) for n, p in model.named_parameters())
    list(wc1.items())
    assert [n for n, _ in model.named_modules()] == modules
    assert _state(model).keys() == before.keys()
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_lora_refuses_bad_targets(world_case):
    from mke_hooks import HparamsError
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.lora.lora_main import apply_lora_to_multimodal_model

    model, tok, reqs = world_case
    with pytest.raises(HparamsError, match="no module ending in 'nope_proj'.*q_proj"):
        apply_lora_to_multimodal_model(model, tok, [reqs[0]],
                                       load_hparams("LoRA", "world", target_modules=["nope_proj"]))
    with pytest.raises(HparamsError, match="wildcards"):
        load_hparams("LoRA", "world", target_modules=["model.layers.*.self_attn.q_proj"])
    with pytest.raises(HparamsError, match="adalora"):
        load_hparams("LoRA", "world", lora_type="adalora")
    with pytest.raises(HparamsError, match="out of range"):
        apply_lora_to_multimodal_model(model, tok, [reqs[0]], load_hparams("LoRA", "world", layers=[99]))


FAMILY_OF_YAML = {"qwen2vl-7b": "qwen2-vl", "qwen2.5vl-7b": "qwen2.5-vl", "qwen3vl-4b": "qwen3-vl",
                  "llavaov-7b": "llava-onevision", "blip2": "blip2", "minigpt4": "minigpt4"}


@pytest.mark.parametrize("key", sorted(FAMILY_OF_YAML))
def test_family_yaml_targets_exist_in_the_tiny_model_of_that_family(key, tiny_model, tiny_lavis):
    """The YAML's layer index is clamped into the tiny model; module kinds and names must resolve."""
    from mke_plugins.adapters import get_adapter
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.lora.lora_main import find_targets

    family = FAMILY_OF_YAML[key]
    model, _ = tiny_lavis(family) if family in ("blip2", "minigpt4") else tiny_model(family)
    ft, lora = load_hparams("FT", key), load_hparams("LoRA", key)
    ad = get_adapter(model, None)
    assert ad.family == family.replace("qwen2.5-vl", "qwen2-vl")
    n = len(ad.layers(model))
    info = ad.layers(model)[min(ft.layer, n - 1)]
    name = f"{info.value_name}.weight"
    assert model.get_parameter(name) is info.value.weight
    assert name.endswith("fc2.weight" if family == "blip2" else "mlp.down_proj.weight")
    lora.layers = [min(i, n - 1) for i in lora.layers]
    targets = find_targets(ad, model, lora)
    assert sorted(full.rsplit(".", 1)[-1] for _, _, full, _ in targets) == sorted(lora.target_modules)
    assert all(type(m) is nn.Linear for _, _, _, m in targets)
    if family in ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision"):
        assert name.startswith("model.language_model.layers.")
