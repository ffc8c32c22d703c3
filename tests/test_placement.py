"""Every tensor an edit creates sits beside the weight it belongs to; offloaded weights are refused.

A model spread over several GPUs (``--device-map auto``) has weights on different devices; a CPU
cannot hold two devices, so the tests spread *dtypes* instead: decoder layers 0, 2 and 3 of the
bundled world model are cast to bfloat16 while the others, the embeddings, the vision tower and
the LM head stay float32 (casting hooks on the cast layers carry the hidden states across, the way
accelerate's hooks carry them across devices). Each registered method then runs one edit, and
every snapshot, delta, neuron block and side weight it made must have the device of its weight and
its dtype (snapshots) or the working dtype for it (trainable state: float32 beside bfloat16), and
the restore must leave the mixed model bit-identical. A tensor made with one global device or
dtype (the first parameter's, ``hparams.device``) would show up as a float32 snapshot of a
bfloat16 weight, or break the forward pass.

The offload refusal is tested for real: on a CPU-only machine a ``--max-memory`` too small for the
world model makes accelerate offload it to disk (``meta`` placeholders), and the loader, the bench
and ``scale`` refuse it naming the first such weight.
"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
from torch import nn

from mke_hooks import MKEError
from mke_plugins.adapters.placement import (
    input_device,
    model_devices,
    offloaded,
    parse_max_memory,
    refuse_offloaded,
    spread,
    work_dtype,
)

pytestmark = pytest.mark.usefixtures("one_thread")

#: decoder layers cast to bfloat16, the others stay float32: DECODE (layers 0-2) and UniKE (2 and 3)
#: edit one of each; ASAM edits only the last layer, which it gets in bfloat16
BF16_LAYERS = {"ASAM": (1, 3)}
DEFAULT_BF16 = (0, 2)
METHODS = ("FT", "LoRA", "DECODE", "LDKE", "ASAM", "UniKE")
#: few optimisation steps: the tests check placement and restore, not edit quality
STEPS = 3


def _cast(value: Any, dtype: torch.dtype) -> Any:
    if torch.is_tensor(value) and value.is_floating_point():
        return value.to(dtype)
    if isinstance(value, tuple):
        return tuple(_cast(v, dtype) for v in value)
    if isinstance(value, list):
        return [_cast(v, dtype) for v in value]
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


def mixed_world(bf16: tuple[int, ...] = DEFAULT_BF16) -> tuple[nn.Module, Any, Any, list[dict[str, Any]]]:
    """``(model, processor, adapter, requests)``: the world model with decoder layers ``bf16`` in bfloat16."""
    from mke_plugins.adapters import get_adapter
    from mke_plugins.testing.conformance import _world

    base, tok, requests = _world()
    model = copy.deepcopy(base)
    adapter = get_adapter(model)
    for i in bf16:
        layer = adapter.layers(model)[i].layer
        layer.to(torch.bfloat16)
        layer.register_forward_pre_hook(lambda m, a, k: (_cast(a, torch.bfloat16), _cast(k, torch.bfloat16)),
                                        with_kwargs=True)
        layer.register_forward_hook(lambda m, a, out: _cast(out, torch.float32))
    return model, tok, adapter, [dict(r) for r in requests[:2]]


class Spy:
    """Records the transient tensors an edit builds: DECODE's column deltas and LDKE's side factors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        from mke_plugins.core.deltas import ColumnDelta
        from mke_plugins.methods.decode import offsets
        from mke_plugins.methods.ldke import edit, side

        self.pairs: list[tuple[str, torch.Tensor, torch.Tensor]] = []  # (what, weight, tensor)
        spy = self

        class Recorded(ColumnDelta):
            def __init__(self, linear: nn.Linear, *args: Any, **kw: Any) -> None:
                super().__init__(linear, *args, **kw)
                spy.pairs.append(("DECODE column delta Z", linear.weight, self.Z))
                spy.pairs.append(("DECODE column index", linear.weight, self.idx))

        def factors(info: Any, rank: int, generator: torch.Generator) -> Any:
            a, b = side.new_factors(info, rank, generator)
            spy.pairs += [("LDKE side A", info.value.weight, a), ("LDKE side B", info.value.weight, b)]
            return a, b

        monkeypatch.setattr(offsets, "ColumnDelta", Recorded)
        monkeypatch.setattr(edit, "new_factors", factors)


def created(model: nn.Module, before: set[int], weights_copy: Any, spy: Spy) -> list[tuple[str, Any, Any]]:
    """``(what, weight, tensor)`` for every tensor the edit made and the weight it belongs to."""
    from mke_plugins.core.neurons import patches_for

    out: list[tuple[str, Any, Any]] = list(spy.pairs)
    for snap in getattr(weights_copy, "_snapshots", []):
        for e in snap._entries:
            out.append((f"snapshot of {e.name}", e.param, e.saved))
            if e.index is not None:
                out.append((f"snapshot index of {e.name}", e.param, e.index))
    for name, p in model.named_parameters():
        if id(p) not in before:  # side modules in the module tree (LoRA's adapters): their layer's weight
            owner = model.get_submodule(name.rsplit(".lora_", 1)[0]) if ".lora_" in name else None
            weight = getattr(getattr(owner, "base_layer", owner), "weight", None)
            out.append((f"new parameter {name}", weight, p))
    from mke_plugins.adapters import get_adapter
    from mke_plugins.methods.asam import memory

    infos = get_adapter(model).layers(model)
    for bank in memory._BANKS.get(model, {}).values():  # ASAM's memory bank: FFN inputs of its layers
        for layer, states in bank.items():
            out.append((f"asam bank of layer {layer}", infos[layer].value.weight, states))
    for gate in ("asam", "unike"):
        patches = patches_for(model, gate=gate, create=False)
        for slot in (patches._slots.values() if patches is not None else ()):
            for block in slot.blocks:
                for pname, p in block.named_parameters():
                    out.append((f"{gate} neuron {pname} of layer {slot.info.index}", slot.info.value.weight, p))
    return out


def check_beside(items: list[tuple[str, Any, Any]]) -> None:
    assert items, "the edit created nothing to check"
    for what, weight, t in items:
        assert weight is not None, f"{what}: no weight found for it"
        assert t.device == weight.device, f"{what}: on {t.device}, its weight on {weight.device}"
        if not t.is_floating_point():
            continue
        want = weight.dtype if what.startswith("snapshot") else work_dtype(weight.dtype)
        if what.startswith("asam bank"):  # fp16 beside half-precision weights, else fp32 (ASAM's README)
            want = torch.float16 if weight.dtype in (torch.float16, torch.bfloat16) else torch.float32
        if what.startswith("new parameter"):  # peft keeps adapters in the base layer's dtype
            assert t.dtype in (weight.dtype, want), f"{what}: {t.dtype}, its weight {weight.dtype}"
        else:
            assert t.dtype == want, f"{what}: {t.dtype}, expected {want} beside a {weight.dtype} weight"


@pytest.mark.parametrize("method", METHODS)
def test_every_tensor_an_edit_creates_follows_its_weight_and_restore_is_exact(method, monkeypatch):
    from mke_plugins.bench.scale_prep import step_field
    from mke_plugins.core.snapshot import assert_same_state, state_of
    from mke_plugins.easyedit import make_apply
    from mke_plugins.hparams import load_hparams
    from mke_plugins.registry import get_registry

    bf16 = BF16_LAYERS.get(method, DEFAULT_BF16)
    model, tok, adapter, requests = mixed_world(bf16)
    for i, layer in enumerate(adapter.layers(model)):
        assert {p.dtype for p in layer.layer.parameters()} == {torch.bfloat16 if i in bf16 else torch.float32}
    hparams = load_hparams(method, "world", **{step_field(method): STEPS})
    spy = Spy(monkeypatch)
    before_names = {id(p) for p in model.parameters()}
    before = state_of(model)
    apply = make_apply(get_registry().get(method))
    edited, wc = apply(model, tok, requests[:1], hparams, copy=False, return_orig_weights=True)
    items = created(model, before_names, wc, spy)
    check_beside(items)
    whats = " ".join(w for w, _, _ in items)
    expect = {"FT": "snapshot", "LoRA": "new parameter", "DECODE": "column delta", "LDKE": "LDKE side",
              "ASAM": "asam bank", "UniKE": "unike neuron"}[method]
    assert expect in whats, f"{method}: nothing of kind {expect!r} was checked ({whats[:200]})"
    if method in ("DECODE", "UniKE"):  # their edits reach a float32 layer and a bfloat16 one
        assert {w.dtype for _, w, _ in items} == {torch.float32, torch.bfloat16}
    if method == "ASAM":
        assert {w.dtype for _, w, _ in items} == {torch.bfloat16}
    logits = adapter.forward(edited, adapter.batch(edited, tok, [_query(requests[0])]))
    assert torch.isfinite(logits).all()
    del edited
    wc()  # EasyEdit's callable restore
    assert_same_state(before, model)


def _query(r: dict[str, Any]) -> Any:
    from mke_plugins.adapters import Query

    return Query(r["image"], r["prompt"], r["target"])


# -- dtype helpers -----------------------------------------------------------------------------

def test_work_dtype_is_float32_unless_the_weight_is_wider():
    assert work_dtype(torch.bfloat16) == work_dtype(torch.float16) == work_dtype(torch.float32) == torch.float32
    assert work_dtype(torch.float64) == torch.float64
    assert work_dtype(torch.bfloat16, torch.float64) == torch.float64
    assert work_dtype(torch.int64) == torch.float32


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_column_delta_follows_its_weight_and_folds_exactly(dtype):
    """A float64 weight keeps its bits outside the touched columns; the delta is float32 or wider."""
    from mke_plugins.core.deltas import ColumnDelta
    from mke_plugins.core.snapshot import WeightSnapshot

    torch.manual_seed(0)
    lin = nn.Linear(6, 4).to(dtype)
    orig = lin.weight.detach().clone()
    delta = ColumnDelta(lin, [1, 4])
    assert delta.Z.dtype == work_dtype(dtype) and delta.Z.device == lin.weight.device
    with torch.no_grad():
        delta.Z.fill_(2.0 ** -20)
    x = torch.randn(3, 6, dtype=dtype)
    with delta:
        hooked = lin(x)
    snap = delta.fold(WeightSnapshot(lin))
    assert snap._entries[0].saved.dtype == dtype
    assert torch.equal(lin.weight[:, [0, 2, 3, 5]], orig[:, [0, 2, 3, 5]])
    if dtype == torch.float64:  # a float32 round trip would have dropped these bits
        assert torch.equal(lin.weight[:, 1], orig[:, 1] + 2.0 ** -20)
        assert torch.allclose(hooked, lin(x))
    snap.restore()
    assert torch.equal(lin.weight, orig)


def test_fit_keeps_a_float64_weight_at_full_precision():
    """The baselines' Adam masters are float32 or wider: a float64 weight is not rounded through float32."""
    from mke_plugins.methods.baselines.train import master_copies

    w64 = torch.randn(4, 4, dtype=torch.float64) * (1 + 2.0 ** -40)
    wbf = torch.randn(4, 4).to(torch.bfloat16)
    m64, mbf = master_copies([w64, wbf])
    assert m64.dtype == torch.float64 and torch.equal(m64, w64)
    assert mbf.dtype == torch.float32 and mbf.device == wbf.device


# -- where inputs go -------------------------------------------------------------------------------

def test_inputs_go_to_the_input_embeddings_device():
    from mke_plugins.testing.conformance import _world

    model = _world()[0]
    assert input_device(model) == model.get_input_embeddings().weight.device
    assert model_devices(model) == [torch.device("cpu")]

    class Towers(nn.Module):  # the first parameter belongs to another tower than the embeddings
        def __init__(self) -> None:
            super().__init__()
            self.vision = nn.Linear(2, 2, device="meta")
            self.embed = nn.Embedding(5, 2)

        def get_input_embeddings(self) -> nn.Module:
            return self.embed

    assert input_device(Towers()) == torch.device("cpu")
    assert model_devices(Towers()) == [torch.device("meta"), torch.device("cpu")]


# -- --max-memory ----------------------------------------------------------------------------------

def test_max_memory_reads_pairs_and_json_and_names_what_is_wrong():
    assert parse_max_memory("0=20GiB, 1=20GiB,cpu=60GiB") == {0: "20GiB", 1: "20GiB", "cpu": "60GiB"}
    assert parse_max_memory('{"cuda:1": "1.5GB", "disk": 1000}') == {1: "1.5GB", "disk": 1000}
    assert parse_max_memory(None) is None and parse_max_memory(" ") is None
    for bad, says in [("0=20XB", "not a memory size"), ("gpu=1GiB", "'gpu' is not a device"),
                      ("0:1GiB", "not DEVICE=SIZE"), ('{"0": -1}', "not a memory size"), ("{0:", "not valid JSON"),
                      ("0=1GiB,cuda:0=2GiB", "given twice")]:
        with pytest.raises(MKEError, match=says):
            parse_max_memory(bad)


# -- offloaded weights are refused -----------------------------------------------------------------

def test_a_weight_on_meta_is_refused_by_name():
    from mke_plugins.testing.conformance import _world

    model = copy.deepcopy(_world()[0])
    refuse_offloaded(model)  # every weight has values: fine
    name = "model.language_model.layers.2.mlp.down_proj.weight"
    module = model.get_submodule(name.rsplit(".", 1)[0])
    module.weight = nn.Parameter(torch.empty_like(module.weight, device="meta"))
    assert offloaded(model) == [name]
    with pytest.raises(MKEError, match=rf"weight '{name}' is on the 'meta' device.*Make the model fit"):
        refuse_offloaded(model, "--model x")


def test_device_map_auto_loads_on_the_cpu_and_an_offloading_map_is_refused():
    from mke_plugins import world
    from mke_plugins.adapters.loading import load_vlm

    model, _ = load_vlm(world.model_path(), device_map="auto")
    assert model_devices(model) == [torch.device("cpu")] and not offloaded(model)
    with pytest.raises(MKEError, match=r"weight 'model\..*' is on the 'meta' device \(the device map puts .* on "
                                       r"'disk'"):
        load_vlm(world.model_path(), device_map="auto", max_memory="cpu=100KB")
    with pytest.raises(MKEError, match="--max-memory only applies with --device-map"):
        load_vlm(world.model_path(), max_memory="cpu=1GiB")
    with pytest.raises(MKEError, match="--device-map 'everywhere': use one of auto"):
        load_vlm(world.model_path(), device_map="everywhere")


def test_spread_keeps_a_cpu_model_and_refuses_a_map_that_offloads():
    from mke_plugins.testing.conformance import _world

    model = copy.deepcopy(_world()[0])
    assert spread(model, "auto") is not None and model_devices(model) == [torch.device("cpu")]
    with pytest.raises(MKEError, match=r"would offload .* to 'disk', starting with weight 'model\."):
        spread(copy.deepcopy(_world()[0]), "auto", {"cpu": 100_000})


def test_bench_refuses_an_offloading_map_naming_the_weight(capsys, tmp_path):
    from mke_plugins.cli import main

    code = main(["bench", "--methods", "FT", "--cases", "1", "--device-map", "auto", "--max-memory", "cpu=100KB",
                 "--json", str(tmp_path / "r.json"), "--plot", "", "--no-progress"])
    err = capsys.readouterr().err
    assert code == 2 and "on the 'meta' device" in err and "weight 'model." in err
    assert main(["bench", "--methods", "FT", "--max-memory", "cpu=1GiB"]) == 2
    assert "--max-memory only applies with --device-map" in capsys.readouterr().err


def test_bench_with_device_map_auto_runs_on_the_cpu(tmp_path):
    import json

    from mke_plugins.cli import main

    out = tmp_path / "r.json"
    assert main(["bench", "--methods", "FT[max_steps=2]", "--cases", "1", "--device-map", "auto", "--json",
                 str(out), "--plot", "", "--no-progress", "--no-generate"]) == 0
    result = json.loads(out.read_text())
    assert result["device"] == "cpu" and result["methods"]["FT[max_steps=2]"]["restore_verified"]


def test_train_takes_the_placement_flags_and_sets_model_parallel():
    from mke_plugins.methods.ldke.ldke_hparams import LDKETrainingHyperParams
    from mke_plugins.registry import get_registry
    from mke_plugins.train import stage_parser, train_args

    entry = get_registry().get("LDKE")
    ns = stage_parser(entry).parse_args(["--trainer", "standin", "--device-map", "auto", "--max-memory", "cpu=8GiB"])
    args = train_args(entry, ns)
    assert "device_map" not in args.options and "max_memory" not in args.options
    hp = args.load_hparams(LDKETrainingHyperParams)
    assert hp.model_parallel is True  # EasyEdit's trainer then leaves the spread model where it is
    model, _ = args.load_model(hp)
    assert model_devices(model) == [torch.device("cpu")]
    with pytest.raises(MKEError, match="--max-memory only applies with --device-map"):
        train_args(entry, stage_parser(entry).parse_args(["--max-memory", "cpu=8GiB"]))


def test_the_flags_name_every_strategy_and_a_wrong_one_fails_before_loading(capsys):
    from mke_plugins.adapters.placement import DEVICE_MAPS
    from mke_plugins.cli import main

    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    out = " ".join(capsys.readouterr().out.split())
    assert all(name in out for name in DEVICE_MAPS) and "--max-memory DEV=SIZE" in out
    for cmd in (["bench"], ["scale", "--size", "test"], ["train", "LDKE"]):
        assert main([*cmd, "--device-map", "everywhere"]) == 2, cmd
        assert "--device-map 'everywhere': use one of auto" in capsys.readouterr().err

