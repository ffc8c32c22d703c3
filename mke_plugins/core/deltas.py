"""Trainable fp32 deltas on selected value columns of a Linear, applied by hook, folded exactly.

A column delta edits neuron values without touching the weight while it trains: a forward hook
adds ``a[..., idx] @ Z`` (fp32, cast back to the output dtype) to the layer output, where ``a``
is the layer input and ``Z`` is ``(k, d_out)``. That equals ``W[:, idx] += Z.T``. ``fold``
writes it into the weight once training is done: the touched columns are snapshotted first, the
sum is formed in fp32 and cast to the weight dtype once. ``Z`` lives on the weight's device; "fp32"
is the working dtype of the weight (:func:`~mke_plugins.adapters.placement.work_dtype`): float32,
or float64 beside a float64 weight, whose untouched bits a float32 round trip would lose.
"""

from __future__ import annotations

from typing import Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mke_plugins.adapters.placement import work_dtype
from mke_plugins.core.snapshot import WeightSnapshot


class ColumnDelta:
    """Delta ``Z`` (fp32, ``(k, d_out)``, starts at zero) on columns ``columns`` of ``linear.weight``."""

    def __init__(self, linear: nn.Linear, columns: Sequence[int] | torch.Tensor, *, init: torch.Tensor | None = None
                 ) -> None:
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"ColumnDelta needs an nn.Linear, got {type(linear).__name__}")
        w = linear.weight
        idx = columns.detach().long() if torch.is_tensor(columns) else torch.tensor(list(columns), dtype=torch.long)
        idx = idx.to(w.device)
        if idx.numel() == 0:
            raise ValueError("ColumnDelta needs at least one column")
        if idx.unique().numel() != idx.numel():
            raise ValueError("ColumnDelta columns must be distinct")
        if int(idx.min()) < 0 or int(idx.max()) >= w.shape[1]:
            raise IndexError(f"column index out of range for a weight of shape {tuple(w.shape)}")
        self.linear = linear
        self.idx = idx
        z = torch.zeros(idx.numel(), w.shape[0], dtype=work_dtype(w.dtype), device=w.device)
        if init is not None:
            z.copy_(init.to(z))
        self.Z = nn.Parameter(z)
        self._handle: RemovableHandle | None = None

    def delta_out(self, a: torch.Tensor) -> torch.Tensor:
        """The fp32 output change for layer input ``a``."""
        return a[..., self.idx.to(a.device)].to(self.Z.dtype) @ self.Z

    def _hook(self, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + self.delta_out(args[0]).to(output.dtype)

    @property
    def installed(self) -> bool:
        return self._handle is not None

    def install(self) -> "ColumnDelta":
        if self._handle is None:
            self._handle = self.linear.register_forward_hook(self._hook)
        return self

    def remove(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> "ColumnDelta":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def fold(self, snapshot: WeightSnapshot) -> WeightSnapshot:
        """Snapshot the touched columns into ``snapshot``, then set ``W[:, idx] += Z.T`` (fp32 sum, one cast)."""
        self.remove()
        w = self.linear.weight
        snapshot.add(w, columns=self.idx)
        with torch.no_grad():
            cols = w.index_select(1, self.idx).to(self.Z.dtype) + self.Z.detach().t()
            w.index_copy_(1, self.idx, cols.to(w.dtype))
        return snapshot


class DeltaSet:
    """Several column deltas handled together (install, remove, parameters, fold)."""

    def __init__(self, deltas: Iterable[ColumnDelta] = ()) -> None:
        self.deltas = list(deltas)

    def add(self, delta: ColumnDelta) -> ColumnDelta:
        self.deltas.append(delta)
        return delta

    def parameters(self) -> Iterator[nn.Parameter]:
        return (d.Z for d in self.deltas)

    def install(self) -> "DeltaSet":
        for d in self.deltas:
            d.install()
        return self

    def remove(self) -> None:
        for d in self.deltas:
            d.remove()

    def __enter__(self) -> "DeltaSet":
        return self.install()

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def fold(self, model: nn.Module, snapshot: WeightSnapshot | None = None) -> WeightSnapshot:
        snapshot = snapshot if snapshot is not None else WeightSnapshot(model)
        for d in self.deltas:
            d.fold(snapshot)
        return snapshot
