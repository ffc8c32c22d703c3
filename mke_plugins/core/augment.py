"""Noisy copies: fit an edit on a neighbourhood of its input, not on the input alone.

Why it exists: a method that fits its change on the exact edit input alone learns whatever
carries that one input to the new answer; how far it carries to a rephrasing then depends on the
model (on the lifelong world's seed-1 model, DECODE's and UniKE's edits reach 0.89 of the
rephrasings, against 0.98 on seed 0, while LDKE, which fits noisy copies too, reaches 0.99 on
both). Fitting the clean input together with copies whose prompt embeddings carry fresh Gaussian
noise at every step asks the change to hold on the inputs around the edit's, the way ASAM's
adversarial variants do. LDKE's ``fit_copies`` / ``fit_noise`` introduced it; DECODE and UniKE use
the same function behind the same two hparams.

The noise is added by a hook on the adapter's embedding output (so it works for every family),
on the prompt positions of the copies only: row 0 stays the clean edit input, and a method's
locality terms read it alone. Its scale is relative: ``noise`` x the standard deviation of the
clean prompt embeddings. The noise changes the input of every layer, so a fit with copies cannot
use prefix replay (``core.replay``): every step runs the full model on ``1 + copies`` rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mke_plugins.adapters.base import Batch, HookPoint, VLMAdapter
from mke_plugins.hparams import hp

from .hooks import HookSet

__all__ = ["NoisyCopies", "copies_hp", "edit_seed", "noise_hp", "noisy_copies"]


def copies_hp(what: str, note: str = "") -> Any:
    """The ``fit_copies`` hyperparameter of a method that fits ``what`` (default 0: no copies)."""
    return hp(0, f"Noisy copies of {what} fitted beside the clean one (core.augment; 0 = the clean input alone, "
                 f"default). Each step then runs the full model on 1 + fit_copies rows (no prefix replay).{note}",
              ge=0)


def noise_hp() -> Any:
    """The ``fit_noise`` hyperparameter (default 0: no copies)."""
    return hp(0.0, "Std of the Gaussian noise on the copies' prompt embeddings, relative to the std of the clean "
                   "prompt embeddings (used when fit_copies > 0; 0 = no copies).", ge=0)


def edit_seed(seed: int, edit: int) -> int:
    """The noise seed of one edit's fit: each edit (id ``edit``) of a sequence draws its own noise."""
    return int(seed) + 104729 * int(edit)


@dataclass
class NoisyCopies:
    """The clean batch's query repeated ``1 + copies`` times, and the hook that adds the noise."""

    batch: Batch
    point: HookPoint  # the embedding output
    add_noise: Callable[[torch.Tensor], torch.Tensor]


def noisy_copies(adapter: VLMAdapter, model: nn.Module, tok: Any, batch: Batch, *, copies: int, noise: float,
                 seed: int, append_eos: bool = False) -> NoisyCopies | None:
    """``batch`` (one row) plus ``copies`` rows of its query whose prompt embeddings get fresh noise
    (std ``noise`` x the clean prompt embeddings' std) on every forward; None when ``copies`` < 1 or
    ``noise`` <= 0. ``append_eos`` must match how ``batch`` was built. Draws come from a generator
    seeded with ``seed``, so a fit is reproducible."""
    if copies < 1 or noise <= 0:
        return None
    query = batch.queries[0]
    aug = adapter.batch(model, tok, [query] * (1 + copies), append_eos=append_eos)
    pos = aug.prompt_mask[0]
    captured: list[torch.Tensor] = []
    point = adapter.embed_output(model)
    with HookSet() as hooks, torch.no_grad():
        hooks.add(point, lambda x: captured.append(x.detach()) or None)
        adapter.forward(model, batch)
    emb = captured[0]
    std = float(emb[0, batch.prompt_mask[0].to(emb.device)].float().std())
    gen = torch.Generator().manual_seed(seed)
    n_pos, d = int(pos.sum()), emb.shape[-1]

    def add_noise(x: torch.Tensor) -> torch.Tensor:
        draw = torch.randn(copies, n_pos, d, generator=gen) * noise * std
        x = x.clone()
        rows = x[1:]
        rows[:, pos.to(x.device)] += draw.to(x.device, x.dtype)
        x[1:] = rows
        return x

    return NoisyCopies(aug, point, add_noise)
