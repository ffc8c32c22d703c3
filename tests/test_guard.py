"""A failed apply leaves the model as it found it: the edit guard, and faults injected into real edits.

The conformance kit's ``interrupted_edit`` check (run for every built-in method by its own test
module) injects a fault into the model's forward pass; the tests here also fail the optimiser
(``Adam.step``), as an exception or Ctrl-C, on a middle step and on the last step of the second
of two requests, and check UniKE's gradients and LDKE's routed state after a fault.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch
from torch import nn

from mke_plugins.core.guard import EditGuard, active_guard
from mke_plugins.core.hooks import hook_counts
from mke_plugins.core.snapshot import WeightSnapshot, assert_same_state, state_of
from mke_plugins.core.wrap import gate_open, is_gate_open, set_always_on
from mke_plugins.easyedit import make_apply
from mke_plugins.registry import get_registry
from mke_plugins.testing.conformance import _hooks, _same, _state, world_setup


class Toy(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.a(x))


def _vandalise(model: Toy) -> None:
    """Everything a careless method could do to a model before it fails."""
    WeightSnapshot(model).add(model.a.weight)
    with torch.no_grad():
        model.a.weight.add_(1.0)
    model.a.register_forward_hook(lambda *a: None)
    model.b.register_forward_pre_hook(lambda *a: None)
    model.side = nn.Linear(2, 2)
    model.a = nn.Sequential(model.a)
    model.note = "left behind"
    model.train()
    model.b.weight.requires_grad_(False)
    model(torch.ones(1, 4)).sum().backward()
    set_always_on(model, "toy")


@pytest.mark.parametrize("exc", [RuntimeError, KeyboardInterrupt])
def test_guard_undoes_everything_on_failure(exc: type[BaseException]) -> None:
    torch.manual_seed(0)
    model = Toy().eval()
    model(torch.ones(1, 4)).sum().backward()  # an existing gradient must come back with its values
    before, hooks, grad_obj = _state(model), hook_counts(model), model.a.weight.grad
    with pytest.raises(exc):
        with EditGuard(model):
            _vandalise(model)
            raise exc("fault")
    _same(before, model)
    assert hook_counts(model) == hooks and not hasattr(model, "note") and not hasattr(model, "side")
    assert model.a.weight.grad is grad_obj and not is_gate_open(model, "toy")
    assert active_guard() is None


def test_guard_keeps_a_successful_edit_and_passes_snapshots_outwards() -> None:
    model = Toy()
    with EditGuard(model) as outer:
        with EditGuard(model) as inner:
            snap = WeightSnapshot(model).add(model.b.bias)
            with torch.no_grad():
                model.b.bias.fill_(3.0)
        assert inner.snapshots == [snap] and outer.snapshots == [snap]
    assert torch.all(model.b.bias == 3.0)
    snap.restore()
    before = state_of(model)
    with pytest.raises(ValueError):
        with EditGuard(model):
            with EditGuard(model):
                WeightSnapshot(model).add(model.b.bias)
                with torch.no_grad():
                    model.b.bias.fill_(5.0)
            raise ValueError("outer fails after the inner edit succeeded")
    assert_same_state(before, model)


def test_gates_opened_inside_a_failed_edit_are_closed() -> None:
    model = Toy()
    with pytest.raises(RuntimeError):
        with EditGuard(model), gate_open(model, "g"):
            raise RuntimeError
    assert not is_gate_open(model, "g")


class _FailingAdam:
    """Patch ``torch.optim.Adam.step`` to raise ``exc`` on its ``at``-th call."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch, at: int, exc: type[BaseException]) -> None:
        self.calls, original = 0, torch.optim.Adam.step

        def step(opt: Any, *a: Any, **k: Any) -> Any:
            self.calls += 1
            if self.calls == at:
                raise exc(f"injected at step {at}")
            return original(opt, *a, **k)

        monkeypatch.setattr(torch.optim.Adam, "step", step)


def _count_steps(method: str, monkeypatch: pytest.MonkeyPatch) -> tuple[int, int]:
    """Adam steps of the first request and of both (a successful run)."""
    counts = []
    for n in (1, 2):
        s = world_setup(method)
        with monkeypatch.context() as m:
            counter = _FailingAdam(m, 0, RuntimeError)
            make_apply(get_registry().get(method))(s.model, s.tok, s.requests[:n], s.hparams)
        counts.append(counter.calls)
    return counts[0], counts[1]


@pytest.mark.slow
@pytest.mark.parametrize("method", ["FT", "DECODE"])
def test_optimiser_fault_leaves_in_place_methods_unchanged(method: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """FT and DECODE change weights in place: a fault at step 3, or on the last step of the second
    request (the first request's edit already folded in), leaves every tensor bit-identical."""
    first, total = _count_steps(method, monkeypatch)
    assert total > first >= 3
    for at, exc in ((3, RuntimeError), (total, KeyboardInterrupt)):
        s = world_setup(method)
        before, hooks = _state(s.model), _hooks(s.model)
        with monkeypatch.context() as m:
            _FailingAdam(m, at, exc)
            with pytest.raises(exc, match="injected"):
                make_apply(get_registry().get(method))(s.model, s.tok, s.requests, s.hparams)
        _same(before, s.model)
        assert _hooks(s.model) == hooks


@pytest.mark.slow
def test_unike_leaves_no_gradient_on_the_base_model() -> None:
    s = world_setup("UniKE")
    apply = make_apply(get_registry().get("UniKE"))
    handles = [apply(s.model, s.tok, r, s.hparams, return_orig_weights=True)[1] for r in s.requests]
    assert all(p.grad is None for p in s.model.parameters()), "an edit left .grad on base weights"
    for h in reversed(handles):
        h()
    assert all(p.grad is None for p in s.model.parameters())


@pytest.mark.slow
def test_interrupted_ldke_edit_is_not_active_afterwards(monkeypatch: pytest.MonkeyPatch) -> None:
    """A fault in the second of two sequential LDKE applies keeps the first edit and nothing of the second."""
    from mke_plugins.methods.ldke.routed import LDKEState

    s = world_setup("LDKE")
    apply = make_apply(get_registry().get("LDKE"))
    apply(s.model, s.tok, s.requests[0], s.hparams)
    state = LDKEState.of(s.model)
    entries, hooked, hooks = [e.id for e in state.memory], sorted(state.side.handles), _hooks(s.model)
    with monkeypatch.context() as m:
        _FailingAdam(m, 2, KeyboardInterrupt)
        with pytest.raises(KeyboardInterrupt):
            apply(s.model, s.tok, s.requests[1], s.hparams)
    assert LDKEState.of(s.model) is state and [e.id for e in state.memory] == entries
    assert sorted(state.side.handles) == hooked and _hooks(s.model) == hooks
