"""Read and edit activations at :class:`HookPoint`s, with hooks that never outlive their use.

Methods capture activations (``capture``), change them for the duration of a forward
(``intervene``), or keep hooks installed across calls (``HookSet``). Every context manager
removes its hooks in ``finally``, so an exception inside the block leaves the model's hook
dictionaries exactly as they were.

A point's *input* is the module's first positional argument (or its ``hidden_states`` /
first tensor keyword argument when the caller passes it by keyword); its *output* is the
returned tensor, or the first element of a returned tuple. Tensors of OPT's FFN are flattened
to ``(B*T, d)``: pass ``seq_shape=(B, T)`` (or a ``positions`` mask, which implies it) and the
hook sees / stores ``(B, T, d)``.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterator, Mapping, Sequence

import torch
from torch.utils.hooks import RemovableHandle

from mke_plugins.adapters.base import HookPoint

EditFn = Callable[[torch.Tensor], "torch.Tensor | None"]


def _find_input(args: tuple, kwargs: dict) -> tuple[str, Any]:
    if args and torch.is_tensor(args[0]):
        return "arg", 0
    if torch.is_tensor(kwargs.get("hidden_states")):
        return "kw", "hidden_states"
    for k, v in kwargs.items():
        if torch.is_tensor(v):
            return "kw", k
    raise RuntimeError("hook point input: the module was called without a tensor argument")


def _as_seq(x: torch.Tensor, seq_shape: tuple[int, int] | None) -> torch.Tensor:
    if seq_shape is not None and x.dim() == 2 and x.shape[0] == seq_shape[0] * seq_shape[1]:
        return x.view(seq_shape[0], seq_shape[1], x.shape[-1])
    return x


def _back(y: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return y.reshape(like.shape) if y.shape != like.shape else y


def _install(point: HookPoint, fn: EditFn, seq_shape: tuple[int, int] | None = None) -> RemovableHandle:
    """One hook on ``point`` calling ``fn(x)``; a non-None result replaces ``x``."""
    if point.where == "input":
        def pre(module, args, kwargs):
            kind, key = _find_input(args, kwargs)
            x = args[key] if kind == "arg" else kwargs[key]
            y = fn(_as_seq(x, seq_shape))
            if y is None:
                return None
            y = _back(y, x)
            if kind == "arg":
                return (y, *args[1:]), kwargs
            return args, {**kwargs, key: y}

        return point.module.register_forward_pre_hook(pre, with_kwargs=True)
    if point.where == "output":
        def post(module, args, output):
            x = output[0] if isinstance(output, tuple) else output
            if not torch.is_tensor(x):
                raise RuntimeError(f"hook point output of {type(module).__name__} is not a tensor")
            y = fn(_as_seq(x, seq_shape))
            if y is None:
                return None
            y = _back(y, x)
            return (y, *output[1:]) if isinstance(output, tuple) else y

        return point.module.register_forward_hook(post)
    raise ValueError(f"HookPoint.where must be 'input' or 'output', got {point.where!r}")


class HookSet:
    """Persistent hooks; ``remove()`` (or leaving the ``with`` block) takes every one off."""

    def __init__(self) -> None:
        self._handles: list[RemovableHandle] = []

    def add(self, point: HookPoint, fn: EditFn, seq_shape: tuple[int, int] | None = None) -> RemovableHandle:
        handle = _install(point, fn, seq_shape)
        self._handles.append(handle)
        return handle

    def remove(self) -> None:
        while self._handles:
            self._handles.pop().remove()

    def __len__(self) -> int:
        return len(self._handles)

    def __enter__(self) -> "HookSet":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.remove()


@dataclass
class Captured:
    """What ``capture`` recorded: per key, one tensor per forward call (in call order)."""

    calls: dict[Hashable, list[torch.Tensor]] = field(default_factory=dict)

    def __getitem__(self, key: Hashable) -> torch.Tensor:
        """The last call's tensor for ``key``."""
        if not self.calls.get(key):
            raise KeyError(f"nothing captured for {key!r} (was the hooked module run?)")
        return self.calls[key][-1]

    def all(self, key: Hashable) -> list[torch.Tensor]:
        return list(self.calls.get(key, []))


def _points(points: HookPoint | Sequence[HookPoint] | Mapping[Hashable, HookPoint]) -> dict[Hashable, HookPoint]:
    if isinstance(points, HookPoint):
        return {0: points}
    if isinstance(points, Mapping):
        return dict(points)
    return dict(enumerate(points))


@contextlib.contextmanager
def capture(points: HookPoint | Sequence[HookPoint] | Mapping[Hashable, HookPoint], *,
            positions: torch.Tensor | None = None, detach: bool = True,
            seq_shape: tuple[int, int] | None = None) -> Iterator[Captured]:
    """Record the tensor at each point during the block.

    ``positions`` (a ``(B, T)`` bool mask) keeps only those positions: the stored tensor is
    ``(N, d)`` in row-major order. ``detach=False`` keeps the autograd graph.
    """
    rec = Captured()
    if positions is not None:
        seq_shape = tuple(positions.shape)  # type: ignore[assignment]
    with HookSet() as hs:
        for key, point in _points(points).items():
            rec.calls[key] = []

            def fn(x: torch.Tensor, key: Hashable = key) -> None:
                v = x.detach() if detach else x
                if positions is not None:
                    if tuple(v.shape[:2]) != tuple(positions.shape):
                        raise RuntimeError(f"capture at {key!r}: activation shape {tuple(v.shape)} does not match "
                                           f"the positions mask {tuple(positions.shape)}")
                    v = v[positions.to(v.device)]
                rec.calls[key].append(v)
                return None

            hs.add(point, fn, seq_shape)
        yield rec


@contextlib.contextmanager
def intervene(points: HookPoint | Sequence[HookPoint] | Mapping[Hashable, HookPoint],
              fn: EditFn | Mapping[Hashable, EditFn], *, seq_shape: tuple[int, int] | None = None
              ) -> Iterator[HookSet]:
    """Replace the tensor at each point by ``fn(x)`` during the block (``None`` keeps ``x``).

    ``fn`` is one function for all points or a mapping with the same keys as ``points``.
    """
    pts = _points(points)
    with HookSet() as hs:
        for key, point in pts.items():
            f = fn[key] if isinstance(fn, Mapping) else fn
            hs.add(point, f, seq_shape)
        yield hs


def hook_counts(model: torch.nn.Module) -> dict[str, int]:
    """Number of forward hooks, pre-hooks and backward hooks over all modules (leak checks)."""
    counts = {"forward": 0, "forward_pre": 0, "backward": 0}
    for m in model.modules():
        counts["forward"] += len(m._forward_hooks)
        counts["forward_pre"] += len(m._forward_pre_hooks)
        counts["backward"] += len(m._backward_hooks) + len(getattr(m, "_backward_pre_hooks", {}))
    return counts
