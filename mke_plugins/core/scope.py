"""Input scopes: an edit's change acts only where the input's representation is close to the edit's own.

Why it exists: in sequential (lifelong) editing every edit's change stays in the model while
hundreds more arrive. A change that acts on inputs far outside its fact (a patch neuron that fires
on half of all prompts) is harmless after one edit and ruinous after fifty: on the lifelong world's
development sequence, each ASAM block fires on more than half of the locality pool's probes, and
after 60 edits only 11 % of those probes keep their answer. The published lifelong editors key
each edit on the input's representation (GRACE's codebook key and deferral radius, WISE's routing
activation, T-Patcher's activation margin). :class:`InputScope` is this project's form of it,
usable by any method whose change is applied at a known point: the unit-normalised
representations of the edit's own input at that point, and a cosine threshold; a position is
admitted when its representation's cosine to one of the keys exceeds the threshold.

The scope is a hard 0/1 mask (no gradient flows through it). Methods set it after an edit is
trained, so the training itself is the method's own; what the scope changes is only where the
finished edit acts later.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["InputScope", "admitted_pairs", "admitted_rows", "stack_keys"]


@dataclass(frozen=True)
class InputScope:
    """Where an edit acts: positions whose representation has cosine > ``threshold`` to a key."""

    keys: torch.Tensor  # (k, d) fp32 unit rows
    threshold: float
    #: where several exclusive scopes of one layer admit a position, only the one with the closest key acts
    #: there (neuron stack); the edits of one fact area then do not add up on each other's inputs
    exclusive: bool = False

    @classmethod
    def around(cls, reps: torch.Tensor, threshold: float, exclusive: bool = False) -> "InputScope":
        """The scope of the representations ``reps`` (``(..., d)``; every row becomes a key)."""
        if not -1.0 <= threshold < 1.0:
            raise ValueError(f"a scope threshold is a cosine in [-1, 1), got {threshold}")
        keys = torch.nn.functional.normalize(reps.detach().reshape(-1, reps.shape[-1]).float(), dim=-1)
        if keys.shape[0] == 0:
            raise ValueError("a scope needs at least one representation")
        return cls(keys, float(threshold), bool(exclusive))

    def cosine(self, q: torch.Tensor) -> torch.Tensor:
        """``(...,)`` fp32: the largest cosine of each position of ``q`` (``(..., d)``) to a key."""
        keys = self.keys.to(q.device)
        return (torch.nn.functional.normalize(q.detach().float(), dim=-1) @ keys.t()).amax(-1)

    def admits(self, q: torch.Tensor) -> torch.Tensor:
        """``(...,)`` bool: the positions of ``q`` inside the scope."""
        return self.cosine(q) > self.threshold

    @property
    def nbytes(self) -> int:
        return self.keys.numel() * self.keys.element_size()


def admitted_pairs(states: torch.Tensor, keys: torch.Tensor, owner: torch.Tensor, thresholds: torch.Tensor,
                   exclusive: bool = False, groups: torch.Tensor | None = None, n_groups: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Many scopes' test at once: ``(rows, owners)``, every pair where a row of ``states`` (``(P, d)``)
    has cosine above the owner's threshold to one of the owner's keys.

    ``keys`` (``(S, d)`` unit rows) are the keys of all owners, ``owner`` (``(S,)``) the owner of each
    key, ``thresholds`` (``(n,)``) one per owner (``inf``: an owner never admits). One matmul for all
    keys; the per-owner maximum is taken only on the rows above the lowest threshold, since after many
    edits most rows lie in no scope. Used by the neuron stack (:mod:`.neuron_stack`) and the
    per-input routing (:mod:`.routing`). With ``exclusive`` a row keeps only its best owner (the largest
    cosine among those above their thresholds; ties: the first owner). ``groups`` (``(P,)`` group index
    of each row, ``n_groups`` groups) pools rows first: a group's cosine to an owner is that of its best
    row, and the returned indices are groups (the routing's input rows, pooled over their positions).
    """
    cos = torch.nn.functional.normalize(states.detach().float(), dim=-1) @ keys.to(states.device).t()  # (P, S)
    thresholds = thresholds.to(states.device)
    rows = (cos.amax(1) > thresholds.min()).nonzero(as_tuple=True)[0]
    if rows.numel() == 0:
        return rows, rows
    sub = cos.index_select(0, rows)
    best = sub.new_full((rows.numel(), thresholds.numel()), -2.0)
    best.scatter_reduce_(1, owner.to(states.device).expand(rows.numel(), -1), sub, reduce="amax")
    if groups is not None:  # rows in no scope were dropped above: they cannot raise a group past a threshold
        g = groups.to(states.device).index_select(0, rows).unsqueeze(1).expand_as(best)
        best = best.new_full((n_groups, best.shape[1]), -2.0).scatter_reduce_(0, g, best, reduce="amax")
        rows = torch.arange(n_groups, device=states.device)
    if exclusive:
        score, who = best.masked_fill(best <= thresholds, float("-inf")).max(1)
        keep = score > float("-inf")
        return rows[keep], who[keep]
    r, who = (best > thresholds).nonzero(as_tuple=True)
    return rows[r], who


def stack_keys(keys: Sequence[torch.Tensor], thresholds: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor,
                                                                                      torch.Tensor]:
    """Many owners' keys (``(k_i, d)`` each) and thresholds as :func:`admitted_pairs` takes them: ``(all
    keys (S, d) fp32, owner index of each key (S,) long, thresholds (n,) fp32)``."""
    owner = torch.cat([torch.full((k.shape[0],), i, dtype=torch.long) for i, k in enumerate(keys)])
    return (torch.cat([k.float() for k in keys]), owner, torch.tensor([float(t) for t in thresholds],
                                                                      dtype=torch.float32))


def admitted_rows(states: torch.Tensor, valid: torch.Tensor | None, keys: torch.Tensor, owner: torch.Tensor,
                  thresholds: torch.Tensor, exclusive: bool = False) -> torch.Tensor:
    """``(B, n)`` bool: which owners admit each input row of ``states`` (``(B, T, d)``) at some valid
    position (``valid``: ``(B, T)`` non-padding; None: every position). :func:`admitted_pairs` with the
    positions pooled per row; used by the per-input routing (:mod:`.routing`) and LDKE's scopes."""
    B, T, _ = states.shape
    flat = states.reshape(B * T, -1)
    row_of = torch.arange(B, device=states.device).repeat_interleave(T)
    if valid is not None:
        keep = valid[:, :T].to(states.device).reshape(B * T).bool()
        flat, row_of = flat[keep], row_of[keep]
    rows, who = admitted_pairs(flat, keys, owner, thresholds, exclusive, groups=row_of, n_groups=B)
    out = torch.zeros(B, thresholds.numel(), dtype=torch.bool, device=states.device)
    out[rows, who] = True
    return out
