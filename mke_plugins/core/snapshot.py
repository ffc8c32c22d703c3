"""Exact weight snapshots and the restore object EasyEdit calls.

In-place methods save the tensors they touch before touching them; restore copies the saved
values back with ``copy_`` under ``no_grad`` (never by subtracting a delta, which is not exact in
low precision). Snapshots are clones in the parameter's own dtype and device. A snapshot taken
while an apply runs also registers with its :class:`~mke_plugins.core.guard.EditGuard`, so an
apply that fails half-way is undone from the same snapshots.

:class:`RestoreHandle` is what ``apply`` returns as ``weights_copy``. EasyEdit main's
``restore_after_edit`` iterates ``weights_copy.items()`` (default branch) or calls it
(``CALLABLE_RESTORE_ALGS``); easyeditor 0.0.1.dev0 iterates ``items()``. Both paths restore:
``items()`` performs the restore and yields nothing, ``__call__`` does the same, and a second
restore changes nothing. It can also run undo callables (remove hooks or side modules).

:func:`state_of` / :func:`assert_same_state` compare whole-model states bit for bit (tests and
the conformance kit).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch
from torch import nn


@dataclass
class _Entry:
    param: torch.Tensor
    name: str
    dim: int | None  # None: whole tensor; 0: rows; 1: columns
    index: torch.Tensor | None
    saved: torch.Tensor


class WeightSnapshot:
    """Clones of selected parameters (whole, or selected rows / columns) and their exact restore."""

    def __init__(self, model: nn.Module) -> None:
        from .guard import active_guard

        self.model = model
        self._entries: list[_Entry] = []
        self._params: dict[str, torch.Tensor] | None = None
        guard = active_guard()
        if guard is not None:  # a failed apply restores from the snapshots it took
            guard.register(self)

    def _param(self, name_or_param: str | torch.Tensor) -> tuple[str, torch.Tensor]:
        if torch.is_tensor(name_or_param):
            for n, p in self.model.named_parameters():
                if p is name_or_param:
                    return n, p
            return "<tensor>", name_or_param
        if self._params is None:
            self._params = dict(self.model.named_parameters())
        if name_or_param not in self._params:
            raise KeyError(f"no parameter named {name_or_param!r} in {type(self.model).__name__}")
        return name_or_param, self._params[name_or_param]

    def add(self, name_or_param: str | torch.Tensor, *, columns: Iterable[int] | torch.Tensor | None = None,
            rows: Iterable[int] | torch.Tensor | None = None) -> "WeightSnapshot":
        """Save a parameter (whole), or its ``columns`` (dim 1) or ``rows`` (dim 0), before it changes."""
        if columns is not None and rows is not None:
            raise ValueError("snapshot either columns or rows of a parameter, not both at once")
        name, p = self._param(name_or_param)
        with torch.no_grad():
            if columns is None and rows is None:
                self._entries.append(_Entry(p, name, None, None, p.detach().clone()))
            else:
                dim = 1 if columns is not None else 0
                sel = columns if columns is not None else rows
                idx = sel.detach().long() if torch.is_tensor(sel) else torch.tensor(list(sel), dtype=torch.long)
                idx = idx.to(p.device).unique()
                self._entries.append(_Entry(p, name, dim, idx, p.detach().index_select(dim, idx).clone()))
        return self

    def restore(self) -> None:
        """Copy every saved value back (latest first, so the earliest snapshot of a value wins)."""
        with torch.no_grad():
            for e in reversed(self._entries):
                if e.dim is None:
                    e.param.copy_(e.saved)
                else:
                    e.param.index_copy_(e.dim, e.index, e.saved)

    @property
    def names(self) -> list[str]:
        return list(dict.fromkeys(e.name for e in self._entries))

    def __len__(self) -> int:
        return len(self._entries)


class RestoreHandle(dict):
    """``weights_copy`` for EasyEdit: ``items()`` and ``__call__`` restore; idempotent.

    The dict itself stays empty, so EasyEdit's default branch (``copy_to_param`` over
    ``items()``) copies nothing after our restore has run.
    """

    def __init__(self, snapshots: Iterable[WeightSnapshot] = (), undo: Iterable[Callable[[], Any]] = ()) -> None:
        super().__init__()
        self._snapshots = list(snapshots)
        self._undo = list(undo)
        self._done = False
        self.stats: Any = None  # the method template's ApplyStats (what each edit did)

    def add_snapshot(self, snapshot: WeightSnapshot) -> "RestoreHandle":
        self._snapshots.append(snapshot)
        self._done = False
        return self

    def add_undo(self, fn: Callable[[], Any]) -> "RestoreHandle":
        self._undo.append(fn)
        self._done = False
        return self

    @property
    def restored(self) -> bool:
        return self._done

    def restore(self) -> None:
        """Run undo callables (latest first), then restore snapshots (latest first). Once."""
        if self._done:
            return
        while self._undo:
            self._undo.pop()()
        for snap in reversed(self._snapshots):
            snap.restore()
        self._done = True

    def __call__(self) -> None:
        self.restore()

    def items(self) -> Iterator[tuple[str, torch.Tensor]]:  # type: ignore[override]
        self.restore()
        return iter(())

    def __repr__(self) -> str:
        return f"RestoreHandle(snapshots={len(self._snapshots)}, undo={len(self._undo)}, restored={self._done})"


# -- whole-state comparison ------------------------------------------------------------------

@dataclass
class StateRecord:
    tensor: torch.Tensor
    dtype: torch.dtype
    device: torch.device
    requires_grad: bool | None  # None for buffers
    grad: torch.Tensor | None = None  # a copy of the parameter's ``.grad``


def state_of(model: nn.Module) -> dict[str, StateRecord]:
    """A bit-exact copy of every parameter and buffer, with dtype, device, ``requires_grad`` and ``.grad``."""
    out: dict[str, StateRecord] = {}
    for n, p in model.named_parameters(remove_duplicate=False):
        grad = None if p.grad is None else p.grad.detach().clone()
        out[f"param:{n}"] = StateRecord(p.detach().clone(), p.dtype, p.device, p.requires_grad, grad)
    for n, b in model.named_buffers(remove_duplicate=False):
        if b is not None:
            out[f"buffer:{n}"] = StateRecord(b.detach().clone(), b.dtype, b.device, None)
    return out


def _grad_diff(a: torch.Tensor | None, b: torch.Tensor | None) -> str | None:
    if a is None and b is None:
        return None
    if a is None or b is None:
        return f".grad {'None' if a is None else 'set'} -> {'None' if b is None else 'set'}"
    return None if a.shape == b.shape and torch.equal(a, b) else ".grad values differ"


def state_diff(before: dict[str, StateRecord], after: dict[str, StateRecord]) -> list[str]:
    """Human-readable differences between two :func:`state_of` records (empty when identical)."""
    diffs = [f"missing {k}" for k in before if k not in after] + [f"extra {k}" for k in after if k not in before]
    for k, a in before.items():
        b = after.get(k)
        if b is None:
            continue
        if a.dtype != b.dtype:
            diffs.append(f"{k}: dtype {a.dtype} -> {b.dtype}")
        elif a.device != b.device:
            diffs.append(f"{k}: device {a.device} -> {b.device}")
        elif a.requires_grad != b.requires_grad:
            diffs.append(f"{k}: requires_grad {a.requires_grad} -> {b.requires_grad}")
        elif a.tensor.shape != b.tensor.shape or not torch.equal(a.tensor, b.tensor):
            diffs.append(f"{k}: values differ")
        elif (g := _grad_diff(a.grad, b.grad)) is not None:
            diffs.append(f"{k}: {g}")
    return diffs


def assert_same_state(before: dict[str, StateRecord], model_or_after: nn.Module | dict[str, StateRecord]) -> None:
    """Raise ``AssertionError`` listing every difference unless the states are bit-identical."""
    after = state_of(model_or_after) if isinstance(model_or_after, nn.Module) else model_or_after
    diffs = state_diff(before, after)
    if diffs:
        shown = "; ".join(diffs[:10]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 10 else "")
        raise AssertionError(f"model state changed: {shown}")
