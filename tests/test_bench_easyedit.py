"""EasyEdit's own methods as bench rows, without EasyEdit: bundled YAMLs, refusals, the undo of adapters.

The host check (``tests/host/test_host_bench_easyedit.py``) runs the real WISE, GRACE and LoRA; here a
stand-in EasyEdit method behaves like GRACE (wraps a layer on its first edit, reuses the wrapper on
later ones, freezes every parameter, adds input-gradient hooks, and its ``weights_copy`` of a reused
edit fails), so the bench's undo is checked on every machine.
"""

from __future__ import annotations

import copy
import importlib.machinery
import re
import sys
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from mke_hooks import MKEError
from mke_plugins.bench.easyedit_rows import BUNDLED_DIR, bundled_names, yaml_for
from mke_plugins.bench.methods import bind, parse_method
from mke_plugins.bench.runner import Bench, BenchConfig, methods_from

NAMES = ["GRACE", "LoRA", "WISE"]


# -- bundled YAMLs ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def world_names() -> tuple[set[str], set[str]]:
    from mke_plugins import world

    model, _ = world.load()
    return {n for n, _ in model.named_parameters()}, {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}


@pytest.mark.parametrize("name", NAMES)
def test_bundled_world_yaml_parses_and_names_world_layers(name, world_names):
    params, leaves = world_names
    path = BUNDLED_DIR / name / "world.yaml"
    cfg = yaml.safe_load(path.read_text())
    assert cfg["alg_name"] == name and cfg["model_name"] == "@world-model"
    assert str(cfg["device"]) == "cpu"
    for inner in cfg.get("inner_params", []):  # EasyEdit writes layers[i]; the parameter must exist
        assert re.sub(r"\[(\d+)\]", r".\1", inner) in params, inner
    for target in cfg.get("target_modules", []):  # peft suffix matching
        assert target in leaves, target
    if name == "WISE":  # what WISE's from_hparams asserts, and what a bench sequence needs
        assert cfg["merge_freq"] % cfg["save_freq"] == 0 and len(cfg["act_margin"]) == 3
        assert cfg["sequential_edit"] is True and cfg["use_chat_template"] is True
    if name == "LoRA":
        assert cfg["lora_type"] == "lora" and cfg["use_chat_template"] is True


def test_bundled_yaml_is_found_and_given_one_wins(tmp_path):
    assert bundled_names("world") == NAMES
    assert yaml_for("WISE", "world", {}) == str(BUNDLED_DIR / "WISE" / "world.yaml")
    mine = str(tmp_path / "wise.yaml")
    assert yaml_for("WISE", "world", {"WISE": mine}) == mine
    with pytest.raises(MKEError, match=r"no bundled YAML for --hparams 'qwen2vl-7b'.*--easyedit-hparams WISE=PATH"):
        yaml_for("WISE", "qwen2vl-7b", {})


def test_without_easyedit_an_easyedit_row_fails_clearly(monkeypatch):
    monkeypatch.setitem(sys.modules, "easyeditor", None)  # find_spec raises, import fails
    monkeypatch.setattr("mke_plugins.easyedit.easyedit_importable", lambda: False)
    with pytest.raises(MKEError, match=r"easyedit:WISE needs EasyEdit \(easyeditor\) on PYTHONPATH"):
        bind(parse_method("easyedit:WISE"), hparams_key="world", common={"device": "cpu"})


# -- a GRACE-like stand-in -------------------------------------------------------------------------
LAYER = "model.language_model.layers.2.mlp.down_proj"


@dataclass
class StackHyperParams:
    alg_name: str = "STACK"
    model_name: str = ""
    name: str = ""
    device: str = "cpu"
    shift: float = 0.5

    @classmethod
    def from_hparams(cls, path):
        return cls(**yaml.safe_load(Path(path).read_text()))


class _Adapter(nn.Module):
    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer
        self.shift = nn.Parameter(torch.zeros(layer.out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x) + self.shift


class _Editor:
    """Like EasyEdit's GRACE: wraps the layer once, later edits reuse the wrapper and cannot reset alone."""

    def __init__(self, model: nn.Module) -> None:
        for p in model.parameters():
            p.requires_grad = False
        parent_name, _, self.leaf = LAYER.rpartition(".")
        self.parent = model.get_submodule(parent_name)
        layer = getattr(self.parent, self.leaf)
        self.original_layer = None
        if not isinstance(layer, _Adapter):
            setattr(self.parent, self.leaf, _Adapter(layer))
            self.original_layer = copy.deepcopy(layer)
        model.model.language_model.embed_tokens.register_forward_hook(lambda m, i, o: o.requires_grad_(True))
        model.config.use_cache = False

    def reset_layer(self) -> None:
        setattr(self.parent, self.leaf, self.original_layer.to("cpu"))  # None on a reused edit: fails


def _stack_apply(model, tok, requests, hparams, copy=False, return_orig_weights=False, keep_original_weight=False,
                 **kwargs):
    assert isinstance(requests, list), "the bench must pass a list"
    editor = _Editor(model)
    with torch.no_grad():
        getattr(editor.parent, editor.leaf).shift.add_(hparams.shift)
    return model, editor.reset_layer


@pytest.fixture
def fake_easyedit(monkeypatch, tmp_path):
    mods = {}
    for name in ("easyeditor", "easyeditor.util", "easyeditor.util.alg_dict", "easyeditor.editors",
                 "easyeditor.editors.utils", "easyeditor.models", "easyeditor.models.stack",
                 "easyeditor.models.stack.stack_main"):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mods[name] = m
        monkeypatch.setitem(sys.modules, name, m)
    monkeypatch.setattr(_stack_apply, "__module__", "easyeditor.models.stack.stack_main")
    mods["easyeditor.models.stack"].StackHyperParams = StackHyperParams
    mods["easyeditor.util.alg_dict"].ALG_MULTIMODAL_DICT = {"STACK": _stack_apply, "IKE": _stack_apply}
    u = mods["easyeditor.editors.utils"]
    u.CALLABLE_RESTORE_ALGS, u.PEFT_RESTORE_ALGS, u.KEEP_EDITED_MODEL_ALGS = {"STACK"}, set(), set()
    y = tmp_path / "stack.yaml"
    y.write_text("alg_name: STACK\nmodel_name: '@world-model'\n")
    return {"STACK": str(y), "IKE": str(y)}


def _bench(yamls: dict[str, str], mode: str, cases: int) -> Bench:
    return Bench(BenchConfig(methods=methods_from("FT,easyedit:STACK,easyedit:IKE"), cases=cases, mode=mode,
                             progress=False, generate=False, easyedit_hparams=yamls))


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_adapter_method_row_restores_and_a_refused_row_is_one_line(fake_easyedit, mode):
    bench = _bench(fake_easyedit, mode, 3)
    assert [m.label for m in bench.methods] == ["FT", "easyedit:STACK"]
    assert bench.probe_batch == 1  # EasyEdit's evaluator protocol: one unpadded row per pass
    model = bench.model
    use_cache = getattr(model.config, "use_cache", "absent")
    r = bench.run()  # verify_restore: raises unless the model is bit-identical after every undo
    assert set(r["methods"]) == {"FT", "easyedit:STACK"} and r["methods"]["easyedit:STACK"]["restore"] == "callable"
    refused = [n for n in r["notes"] if "easyedit:IKE" in n]
    assert len(refused) == 1 and "in-context examples" in refused[0] and "\n" not in refused[0]
    assert any("one unpadded row per pass" in n for n in r["notes"])
    assert all(p.requires_grad for p in bench.model.parameters()) and bench.model is model
    assert getattr(bench.model.config, "use_cache", "absent") == use_cache
    assert not isinstance(bench.model.get_submodule(LAYER), _Adapter)


def test_reused_adapter_cannot_be_reset_alone(fake_easyedit):
    """Why the bench defers such an edit's undo: EasyEdit's own restore of it fails."""
    bench = _bench(fake_easyedit, "sequential", 2)
    m = next(x for x in bench.methods if x.label == "easyedit:STACK")
    _, first = m.apply(bench.model, bench.tok, [bench.requests[0]], m.hparams)
    _, second = m.apply(bench.model, bench.tok, [bench.requests[1]], m.hparams)
    assert not first.reused_adapter and second.reused_adapter
    with pytest.raises(AttributeError):
        second.weights_copy()
    first.restore_for_bench("callable", bench.model, bench.model)
    assert not isinstance(bench.model.get_submodule(LAYER), _Adapter)


def test_only_refused_rows_is_an_error_naming_them(fake_easyedit):
    with pytest.raises(MKEError, match="easyedit:IKE cannot be benched"):
        Bench(BenchConfig(methods=methods_from("easyedit:IKE"), cases=1, easyedit_hparams=fake_easyedit))
