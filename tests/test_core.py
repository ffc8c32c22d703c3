"""Core machinery on small stand-alone modules: hooks, snapshots, restore handles, deltas, requests."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from mke_hooks.errors import RequestError
from mke_plugins.adapters.base import HookPoint
from mke_plugins.core.deltas import ColumnDelta, DeltaSet
from mke_plugins.core.hooks import HookSet, capture, hook_counts, intervene
from mke_plugins.core.modes import frozen
from mke_plugins.core.requests import (
    fine_locality,
    get_field,
    normalize_requests,
    portability,
    query_of,
    text_only_prompt,
)
from mke_plugins.core.snapshot import RestoreHandle, WeightSnapshot, assert_same_state, state_diff, state_of


class Block(nn.Module):
    def __init__(self, d: int = 6, f: int = 10) -> None:
        super().__init__()
        self.up = nn.Linear(d, f)
        self.down = nn.Linear(f, d)
        self.register_buffer("scale", torch.ones(d))

    def forward(self, x: torch.Tensor, *, extra: float = 0.0) -> torch.Tensor:
        return self.down(torch.relu(self.up(x))) * self.scale + extra


def _model(seed: int = 0, dtype: torch.dtype = torch.float32) -> Block:
    torch.manual_seed(seed)
    return Block().to(dtype)


def test_capture_inputs_outputs_and_positions():
    m = _model()
    x = torch.randn(2, 3, 6)
    mask = torch.tensor([[True, False, True], [False, False, True]])
    with capture({"in": HookPoint(m.down, "input"), "out": HookPoint(m, "output")}) as rec:
        y = m(x)
    assert torch.equal(rec["out"], y.detach())
    assert rec["in"].shape == (2, 3, 10)
    with capture(HookPoint(m.down, "input"), positions=mask) as rec2:
        m(x)
    assert torch.equal(rec2[0], rec["in"][mask])
    # flattened tensors (OPT FFN) are seen as (B, T, d) when the shape is known
    flat = HookPoint(m.down, "input")
    with capture(flat, positions=mask) as rec3:
        m(x.reshape(6, 6))
    assert torch.equal(rec3[0], rec["in"][mask])
    with pytest.raises(KeyError):
        _ = rec3["missing"]


def test_intervene_changes_output_and_input_keyword():
    m = _model()
    x = torch.randn(2, 3, 6)
    base = m(x)
    with intervene(HookPoint(m, "output"), lambda y: y * 0):
        assert m(x).abs().sum() == 0
    with intervene(HookPoint(m, "input"), lambda h: h + 1):
        assert torch.allclose(m(x), m.forward(x + 1))  # .forward bypasses hooks
    # the input given by keyword is found too
    with intervene(HookPoint(m.up, "input"), lambda h: torch.zeros_like(h)):
        y = m.up(input=x)
    assert torch.equal(y, m.up.bias.expand_as(y))
    assert torch.equal(m(x), base)


def test_hooks_removed_after_exception_and_hookset():
    m = _model()
    before = hook_counts(m)
    with pytest.raises(RuntimeError, match="boom"):
        with capture(HookPoint(m.up, "output")), intervene(HookPoint(m.down, "input"), lambda h: h):
            m(torch.randn(1, 2, 6))
            raise RuntimeError("boom")
    assert hook_counts(m) == before
    hs = HookSet()
    hs.add(HookPoint(m.up, "output"), lambda y: y)
    hs.add(HookPoint(m.down, "input"), lambda y: y)
    assert len(hs) == 2 and hook_counts(m)["forward"] == 1 and hook_counts(m)["forward_pre"] == 1
    hs.remove()
    assert hook_counts(m) == before
    with pytest.raises(ValueError):
        with intervene(HookPoint(m.up, "middle"), lambda y: y):  # type: ignore[arg-type]
            pass
    assert hook_counts(m) == before


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_snapshot_restores_bit_exactly(dtype):
    m = _model(dtype=dtype)
    before = state_of(m)
    snap = WeightSnapshot(m).add("down.weight", columns=[1, 4]).add("up.weight", rows=torch.tensor([2]))
    snap.add(m.down.bias)
    with torch.no_grad():
        m.down.weight[:, 1] += 0.3
        m.down.weight[:, 4] *= 3
        m.up.weight[2] -= 1
        m.down.bias += 1
    assert state_diff(before, state_of(m))
    snap.restore()
    assert_same_state(before, m)
    assert m.down.weight.dtype == dtype
    with pytest.raises(KeyError):
        WeightSnapshot(m).add("nope.weight")


def test_overlapping_snapshots_restore_to_the_earliest_value():
    m = _model()
    before = state_of(m)
    s1 = WeightSnapshot(m).add("down.weight", columns=[1])
    with torch.no_grad():
        m.down.weight[:, 1] += 1
    s2 = WeightSnapshot(m).add("down.weight")
    with torch.no_grad():
        m.down.weight += 1
    handle = RestoreHandle([s1, s2])
    handle.restore()
    assert_same_state(before, m)


def test_restore_handle_is_dict_items_callable_idempotent_and_runs_undo():
    m = _model()
    before = state_of(m)
    snap = WeightSnapshot(m).add("down.weight")
    hs = HookSet()
    hs.add(HookPoint(m.down, "output"), lambda y: y + 1)
    calls = []
    handle = RestoreHandle([snap], undo=[hs.remove, lambda: calls.append(1)])
    with torch.no_grad():
        m.down.weight.mul_(2)
    assert isinstance(handle, dict) and len(handle) == 0
    assert list(handle.items()) == []
    assert_same_state(before, m)
    assert hook_counts(m)["forward"] == 0 and calls == [1]
    with torch.no_grad():
        m.down.weight.mul_(2)  # changed after the restore: a second restore must not touch it
    changed = state_of(m)
    handle()
    for _ in handle.items():
        pass
    assert_same_state(changed, m)
    assert calls == [1]


def test_state_diff_reports_requires_grad_and_dtype():
    m = _model()
    before = state_of(m)
    m.up.weight.requires_grad_(False)
    assert any("requires_grad" in d for d in state_diff(before, state_of(m)))
    m.up.weight.requires_grad_(True)
    m.scale = m.scale.double()
    assert any("dtype" in d for d in state_diff(before, state_of(m)))
    with pytest.raises(AssertionError, match="model state changed"):
        assert_same_state(before, m)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_column_delta_hook_equals_fold_and_restores(dtype):
    m = _model(dtype=dtype)
    before = state_of(m)
    x = torch.randn(2, 3, 6, dtype=dtype)
    base = m(x)
    d = ColumnDelta(m.down, [2, 7])
    assert d.Z.dtype == torch.float32 and d.Z.shape == (2, 6)
    with d, frozen(m):
        assert torch.equal(m(x), base)  # zero delta
        opt = torch.optim.SGD([d.Z], lr=1.0)
        loss = m(x).float().pow(2).sum()
        loss.backward()
        opt.step()
        hooked = m(x).detach()
    assert not d.installed and torch.equal(m(x), base)
    # fp32 reference of the folded weight
    w_ref = m.down.weight.detach().float().clone()
    w_ref[:, [2, 7]] += d.Z.detach().t()
    snap = d.fold(WeightSnapshot(m))
    assert torch.equal(m.down.weight, w_ref.to(dtype))
    untouched = [i for i in range(10) if i not in (2, 7)]
    assert torch.equal(m.down.weight[:, untouched], before["param:down.weight"].tensor[:, untouched])
    folded = m(x).detach()
    tol = 1e-5 if dtype == torch.float32 else 5e-2
    torch.testing.assert_close(folded.float(), hooked.float(), atol=tol, rtol=tol)
    snap.restore()
    assert_same_state(before, m)


def test_delta_set_and_bad_columns():
    m = _model()
    before = state_of(m)
    ds = DeltaSet([ColumnDelta(m.down, [0]), ColumnDelta(m.up, [1, 2])])
    assert len(list(ds.parameters())) == 2
    with ds:
        assert hook_counts(m)["forward"] == 2
    assert hook_counts(m)["forward"] == 0
    with torch.no_grad():
        for z in ds.parameters():
            z.fill_(0.25)
    snap = ds.fold(m)
    assert state_diff(before, state_of(m))
    snap.restore()
    assert_same_state(before, m)
    with pytest.raises(IndexError):
        ColumnDelta(m.down, [10])
    with pytest.raises(ValueError):
        ColumnDelta(m.down, [1, 1])
    with pytest.raises(TypeError):
        ColumnDelta(m, [0])  # type: ignore[arg-type]


def test_normalize_requests_shapes_and_errors():
    req = {"prompt": "p?", "target": "t", "image": None, "text_only_prompt": "", "portability": []}
    out = normalize_requests(req)
    assert out == [req] and out[0] is not req
    assert normalize_requests([req, req])[1] == req
    assert text_only_prompt(out[0]) is None and portability(out[0]) == [] and get_field(out[0], "x", 3) == 3
    assert query_of(out[0]).target == "t"
    cases = [({"target": "t", "image": None}, "prompt"), ({"prompt": "p", "image": None}, "target"),
             ({"prompt": "p", "target": "", "image": None}, "target"), ({"prompt": "p", "target": "t"}, "image"),
             ({"prompt": 3, "target": "t", "image": None}, "prompt")]
    for bad, field in cases:
        with pytest.raises(RequestError) as err:
            normalize_requests([req, bad])
        assert f"request #1, field {field!r}" in str(err.value)
        assert isinstance(err.value, ValueError)
    with pytest.raises(RequestError):
        normalize_requests("prompt")
    with pytest.raises(RequestError):
        normalize_requests([])
    with pytest.raises(RequestError, match="needs an image"):
        normalize_requests(req, require_image=True)
    probes = {**req, "fine_locality": [{"prompt": "a", "answer": "b"}], "portability": {"prompt": "c", "answer": "d"}}
    assert fine_locality(probes) == [{"prompt": "a", "answer": "b"}]
    assert portability(probes) == [{"prompt": "c", "answer": "d"}]
    with pytest.raises(RequestError, match="portability"):
        portability({**req, "portability": [{"prompt": "x"}]})


def test_frozen_restores_flags_and_modes_even_on_error():
    import torch
    from torch import nn

    from mke_plugins.core.modes import frozen

    model = nn.Sequential(nn.Linear(2, 2), nn.Dropout(), nn.Linear(2, 2))
    model.train()
    model[2].weight.requires_grad_(False)
    before = [p.requires_grad for p in model.parameters()]
    try:
        with frozen(model, trainable=[model[0].bias]):
            assert not model.training and not model[1].training
            assert [p.requires_grad for p in model.parameters()] == [False, True, False, False]
            raise RuntimeError("inside")
    except RuntimeError:
        pass
    assert [p.requires_grad for p in model.parameters()] == before
    assert model.training and model[1].training
    assert torch.is_tensor(model[0].weight)


def test_noisy_copies_perturb_only_the_copies_prompt_positions(tiny_model):
    """core.augment: row 0 stays the clean input; each copy gets fresh noise of the asked scale on its
    prompt positions only (answer positions and padding untouched); draws are reproducible per seed."""
    from types import SimpleNamespace

    from mke_plugins.adapters import Query, get_adapter
    from mke_plugins.core.augment import noisy_copies
    from mke_plugins.testing.images import native_image

    model, tok = tiny_model("qwen2-vl")
    hooks_before = hook_counts(model)
    adapter = get_adapter(model, SimpleNamespace(model_name="qwen2-vl"))
    batch = adapter.batch(model, tok, [Query(native_image("qwen2-vl"), "What is shown?", "Rome")])
    assert noisy_copies(adapter, model, tok, batch, copies=0, noise=1.0, seed=0) is None
    assert noisy_copies(adapter, model, tok, batch, copies=2, noise=0.0, seed=0) is None

    def embeddings(copies, *, calls=1):
        out = []
        with HookSet() as hooks, torch.no_grad():
            hooks.add(copies.point, copies.add_noise)
            hooks.add(copies.point, lambda x: out.append(x.detach().clone()) or None)
            for _ in range(calls):
                adapter.forward(model, copies.batch)
        return out

    a = noisy_copies(adapter, model, tok, batch, copies=2, noise=2.0, seed=5)
    assert a is not None and len(a.batch) == 3
    first, second = embeddings(a, calls=2)
    with HookSet() as hooks, torch.no_grad():
        clean = []
        hooks.add(a.point, lambda x: clean.append(x.detach().clone()) or None)
        adapter.forward(model, batch)
    clean = clean[0][0]
    prompt = a.batch.prompt_mask[0]
    assert torch.equal(first[0], clean) and torch.equal(second[0], clean)
    for row in (1, 2):
        diff = (first[row] - clean).abs().sum(-1)
        assert bool((diff[prompt] > 0).all()) and bool((diff[~prompt] == 0).all())
        ratio = float((first[row] - clean)[prompt].std() / clean[prompt].std())
        assert 1.5 < ratio < 2.5, ratio  # the asked scale, relative to the clean prompt embeddings
    assert not torch.equal(first[1], second[1])  # fresh draws on every forward
    assert not torch.equal(first[1], first[2])  # and per copy
    again = embeddings(noisy_copies(adapter, model, tok, batch, copies=2, noise=2.0, seed=5))[0]
    assert torch.equal(again, first)  # reproducible for a seed
    other = embeddings(noisy_copies(adapter, model, tok, batch, copies=2, noise=2.0, seed=6))[0]
    assert not torch.equal(other[1], first[1])
    assert hook_counts(model) == hooks_before  # nothing left on the model
