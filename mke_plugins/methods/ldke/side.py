"""Low-rank side deltas and the edit memory (README, "Algorithm", steps 5–8, and "Restore").

An edit is a memory entry: its routing key phi(e), its layers S_e, one rank-r side delta
Delta W_l = B_l A_l per layer (float32; A ~ N(0, 1/d_ff), B = 0), the target text and the
exact-match fingerprint of its input. The base weights are never written: a forward hook on each
edited value matrix adds ``B_j (A_j a)`` to the output of the rows routed to entry ``j`` (input
cast up to float32, result cast back to the output dtype). Rows routed nowhere are returned
untouched, so the original path is the original model bit for bit. Deltas of different entries
are never summed for one row unless routing is switched off (ablation).

:class:`SidePaths` owns the hooks (at most one per value matrix, removed when the memory is
empty), the current per-row route and the gate (``core.wrap``): hooks act only while the routed
model's gate is open, so the bare model's forward is the original one even mid-edit;
:class:`EditMemory` owns the entries, the supersede links of re-edited facts and their removal
by restore.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mke_plugins.adapters.base import LayerInfo
from mke_plugins.core.scope import InputScope


@dataclass
class EditEntry:
    """One edit in the memory."""

    id: int
    layers: list[int]
    A: dict[int, nn.Parameter]  # (r, d_ff) float32
    B: dict[int, nn.Parameter]  # (d, r) float32
    key_phi: torch.Tensor  # (3d,) float32, phi of the edit input with every delta off
    key_w: torch.Tensor | None  # head projection of key_phi (None without a head)
    prompt_tokens: tuple[int, ...]
    image_mean: torch.Tensor  # (d,) pre-LN image mean at layer f (exact-match guard)
    has_image: bool
    target: str
    superseded_by: int | None = None
    stats: dict[str, Any] = field(default_factory=dict)
    #: lifelong mode (``scope_threshold``): the inputs this entry may be routed to; None = any the head picks
    scope: InputScope | None = None

    def parameters(self) -> list[nn.Parameter]:
        return [p for layer in self.layers for p in (self.A[layer], self.B[layer])]

    def norm_penalty(self) -> torch.Tensor:
        """sum_l ||B_l A_l||_F^2 = sum_l sum((B^T B) * (A A^T)), without forming B A."""
        total = torch.zeros((), device=self.A[self.layers[0]].device)
        for layer in self.layers:  # each layer's term beside its factors, summed on the first layer's device
            term = ((self.B[layer].t() @ self.B[layer]) * (self.A[layer] @ self.A[layer].t())).sum()
            total = total + term.to(total.device)
        return total

    def floats(self) -> int:
        return sum(p.numel() for p in self.parameters())


def new_factors(info: LayerInfo, rank: int, generator: torch.Generator) -> tuple[nn.Parameter, nn.Parameter]:
    """A ~ N(0, 1/d_ff) (r x d_ff) and B = 0 (d x r), float32 on the value matrix's device."""
    w = info.value.weight
    d, d_ff = int(w.shape[0]), int(w.shape[1])
    a = torch.randn(rank, d_ff, generator=generator) / math.sqrt(d_ff)
    return (nn.Parameter(a.to(w.device)), nn.Parameter(torch.zeros(d, rank, device=w.device)))


class EditMemory:
    """Entries by id, in insertion order, with supersede links."""

    def __init__(self) -> None:
        self.entries: dict[int, EditEntry] = {}
        self._next = 0

    def new_id(self) -> int:
        self._next += 1
        return self._next - 1

    @property
    def next_id(self) -> int:
        return self._next

    def rewind(self, next_id: int) -> None:
        """Give back the ids issued since ``next_id`` (a failed apply's), once none of them is in use,
        so the next edit gets the id (and the id-seeded augmentation) it would have had."""
        if all(i < next_id for i in self.entries):
            self._next = next_id

    def add(self, entry: EditEntry) -> None:
        self.entries[entry.id] = entry

    def resolve(self, entry_id: int) -> int:
        """Follow supersede links to the entry that now answers for ``entry_id``."""
        seen = set()
        while self.entries[entry_id].superseded_by is not None and entry_id not in seen:
            seen.add(entry_id)
            entry_id = self.entries[entry_id].superseded_by  # type: ignore[assignment]
        return entry_id

    def supersede(self, old: int, new: int) -> None:
        self.entries[old].superseded_by = new

    def remove(self, ids: Sequence[int]) -> None:
        """Drop ``ids``; entries they superseded answer for themselves again."""
        gone = set(ids)
        for i in gone:
            self.entries.pop(i, None)
        for e in self.entries.values():
            if e.superseded_by in gone:
                e.superseded_by = None

    def active(self) -> list[EditEntry]:
        return [e for e in self.entries.values() if e.superseded_by is None]

    def layers(self) -> set[int]:
        return {layer for e in self.entries.values() for layer in e.layers}

    def __len__(self) -> int:
        return len(self.entries)

    def __iter__(self) -> Iterator[EditEntry]:
        return iter(self.entries.values())


class SidePaths:
    """The forward hooks that add the routed entries' deltas to the value matrices' outputs."""

    def __init__(self, infos: list[LayerInfo], memory: EditMemory, gate: Callable[[], bool] | None = None) -> None:
        self.infos = infos
        self.memory = memory
        self.gate = gate  # the hooks act only while this is true (the routed model's call)
        self.handles: dict[int, RemovableHandle] = {}
        self._groups: list[tuple[EditEntry, torch.Tensor | None]] = []  # (entry, rows or None = all rows)
        self._batch = 0

    # -- routing state -------------------------------------------------------------------
    def set_route(self, route: Sequence[Sequence[int]]) -> None:
        """Per row, the entry ids whose deltas are active (empty: the original weights)."""
        self._batch = len(route)
        groups: dict[int, list[int]] = {}
        for r, ids in enumerate(route):
            for i in ids:
                groups.setdefault(int(i), []).append(r)
        self._groups = []
        for i, rows in groups.items():
            entry = self.memory.entries[i]
            self._groups.append((entry, None if len(rows) == self._batch else torch.tensor(rows)))

    def clear_route(self) -> None:
        self._groups, self._batch = [], 0

    @property
    def routed(self) -> bool:
        return bool(self._groups)

    # -- hooks ---------------------------------------------------------------------------
    def install(self, layers: Sequence[int]) -> None:
        for layer in layers:
            if layer not in self.handles:
                self.handles[layer] = self.infos[layer].value.register_forward_hook(self._hook(layer))

    def uninstall(self) -> None:
        while self.handles:
            self.handles.popitem()[1].remove()
        self.clear_route()

    def keep_only(self, layers: Iterable[int]) -> None:
        """Remove the hooks of layers not in ``layers`` (undo of a failed edit's ``install``)."""
        keep = set(layers)
        for layer in [layer for layer in self.handles if layer not in keep]:
            self.handles.pop(layer).remove()

    def _hook(self, layer: int):
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if not self._groups or (self.gate is not None and not self.gate()):
                return None
            groups = [(e, rows) for e, rows in self._groups if layer in e.A]
            if not groups:
                return None
            a = args[0]
            flat = a.dim() == 2
            n = self._batch
            a3 = a.view(n, -1, a.shape[-1]) if flat else a
            o3 = out.view(n, -1, out.shape[-1]) if flat else out
            if a3.shape[0] != n:  # generate() may expand rows (beams): rows stay in blocks of equal size
                if a3.shape[0] % n:
                    raise RuntimeError(f"LDKE side path: {a3.shape[0]} rows for a route of {n}")
                rep = a3.shape[0] // n
                groups = [(e, None if rows is None else
                           (rows.unsqueeze(1) * rep + torch.arange(rep)).flatten()) for e, rows in groups]
            result = o3
            for entry, rows in groups:
                A, B = entry.A[layer], entry.B[layer]
                if rows is None:
                    delta = (a3.float() @ A.t()) @ B.t()
                    result = result + delta.to(out.dtype)
                else:
                    rows = rows.to(a3.device)
                    delta = (a3.index_select(0, rows).float() @ A.t()) @ B.t()
                    result = result.index_add(0, rows, delta.to(out.dtype))
            return result.view_as(out) if flat else result
        return hook
