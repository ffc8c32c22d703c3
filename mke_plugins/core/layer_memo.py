"""Inside the replay's first layer: serve from the capture what runs before the edited module.

Why it exists: :mod:`~mke_plugins.core.replay` re-runs decoder layers ``L..`` from the state that
enters layer ``L``. When an edit changes one module *inside* layer ``L`` (DECODE's value matrix,
``down_proj``), the parts of layer ``L`` that finish before that module first runs (attention, the
norms, the gate and up projections) see the same inputs on every pass, so their outputs are the
capture's. :class:`LayerMemo` records those outputs during the capture pass and, on replayed passes,
makes each of them return its recorded output instead of computing it again. The layer's own code
still runs (residual adds, the element-wise product feeding the edited module), so the result is
bit-identical.

A module is served from the capture only when that is sure to be exact: it finished before the
edited module started, ran once, is not in training mode, has no parameter that requires grad, is
not already wrapped by another library (an instance ``forward``, as accelerate's device hooks set),
and its recorded output was not written in place afterwards. Only the outermost such modules are
replaced (their children are then not called). Its hooks still run around the recorded output, as
they did around the computed one. On every replayed pass :meth:`LayerMemo.stale` checks that the
served modules' parameters, hooks and recorded outputs are unchanged; the replay captures again
otherwise.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch
from torch import nn

__all__ = ["LayerMemo", "MemoPlan"]

def _tensors(value: Any) -> Iterator[torch.Tensor]:
    if torch.is_tensor(value):
        yield value
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)


def _hooks(m: nn.Module) -> int:
    return sum(len(getattr(m, d)) for d in ("_forward_hooks", "_forward_pre_hooks"))


@dataclass
class _Recorded:
    output: Any  # None for a module that first finished after the edited module started
    versions: tuple[int, ...]
    calls: int = 1
    after: bool = False  # finished after the edited module started: never served


@dataclass
class MemoPlan:
    """The modules of one captured batch served from the capture, with what makes them stale."""

    served: list[tuple[nn.Module, Any]]
    params: list[torch.Tensor]
    param_versions: tuple[int, ...]
    hooks: int
    outputs: list[tuple[torch.Tensor, int]] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.served)


class LayerMemo:
    """The submodules of ``layer`` that run before ``inside`` (see the module docstring)."""

    def __init__(self, layer: nn.Module, inside: nn.Module) -> None:
        names = {id(m): n for n, m in layer.named_modules()}
        path = names.get(id(inside))
        if not path:
            raise ValueError("prefix replay: the module given as `inside` is not a submodule of the replay's "
                             "first decoder layer")
        self.layer, self.inside = layer, inside
        self._names = {id(m): n for n, m in layer.named_modules() if n}
        self.candidates = [m for n, m in layer.named_modules()
                           if n and not (n == path or path.startswith(n + ".") or n.startswith(path + "."))]

    @contextlib.contextmanager
    def recording(self) -> Iterator[dict[int, _Recorded]]:
        """Record, during one full pass, the outputs of the candidates that finish before ``inside`` starts."""
        record: dict[int, _Recorded] = {}
        state = {"started": False}

        def start(*_: Any) -> None:
            state["started"] = True

        def done(m: nn.Module, _args: Any, out: Any) -> None:
            seen = record.get(id(m))
            if seen is not None:
                seen.calls += 1
            elif not state["started"]:
                record[id(m)] = _Recorded(out, tuple(t._version for t in _tensors(out)))
            else:
                record[id(m)] = _Recorded(None, (), after=True)

        handles = [self.inside.register_forward_pre_hook(start, prepend=True)]
        try:
            # prepend: the raw forward output, before any other hook of the module changes it (those run again)
            handles += [m.register_forward_hook(done, prepend=True) for m in self.candidates]
            yield record
        finally:
            for h in handles:
                h.remove()

    def plan(self, record: dict[int, _Recorded]) -> MemoPlan | None:
        """The outermost candidates safe to serve (module docstring), or ``None`` when there are none."""
        ok = {id(m) for m in self.candidates if self._servable(m, record.get(id(m)))}
        served = [m for m in self.candidates
                  if id(m) in ok and not any(id(a) in ok for a in self._ancestors(m))]
        if not served:
            return None
        params = [p for m in served for p in m.parameters()]
        outputs = [(t, t._version) for m in served for t in _tensors(record[id(m)].output)]
        return MemoPlan([(m, record[id(m)].output) for m in served], params, tuple(p._version for p in params),
                        sum(_hooks(s) for m in served for s in m.modules()), outputs)

    def _ancestors(self, m: nn.Module) -> list[nn.Module]:
        name = self._names[id(m)]
        return [a for a in self.candidates if name.startswith(self._names[id(a)] + ".")]

    @staticmethod
    def _servable(m: nn.Module, rec: _Recorded | None) -> bool:
        if rec is None or rec.after or rec.calls != 1 or "forward" in m.__dict__:
            return False
        if any(s.training for s in m.modules()) or any(p.requires_grad for p in m.parameters()):
            return False
        return tuple(t._version for t in _tensors(rec.output)) == rec.versions  # not written in place since

    @staticmethod
    def stale(plan: MemoPlan) -> str | None:
        """Why the plan's recorded outputs may no longer be what the modules would compute, or ``None``."""
        if tuple(p._version for p in plan.params) != plan.param_versions:
            return "a parameter of the replay layer before the edited module was written"
        if any(p.requires_grad for p in plan.params):
            return "a parameter of the replay layer before the edited module requires grad"
        if sum(_hooks(s) for m, _ in plan.served for s in m.modules()) != plan.hooks:
            return "the hooks of the replay layer before the edited module changed"
        if any(t._version != v for t, v in plan.outputs):
            return "an output recorded in the replay layer was written"
        return None

    @staticmethod
    @contextlib.contextmanager
    def serving(plan: MemoPlan) -> Iterator[None]:
        """Each served module returns its recorded output for the block (hooks still run around it)."""
        done: list[nn.Module] = []
        try:
            for m, out in plan.served:
                m.forward = (lambda o: (lambda *_a, **_k: o))(out)  # type: ignore[method-assign]
                done.append(m)
            yield
        finally:
            for m in done:
                del m.forward
