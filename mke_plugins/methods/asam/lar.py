"""LAR: Latent Adversarial Robustification (README, "Algorithm" 2).

A variant of the anchor is a point z + δ in the joint text+image latent space: δ is added by a
forward hook at ``adapter.embed_output(model)`` (the sequence entering decoder layer 0), so it
feeds every layer. δ lives on prompt positions only (never answer tokens or padding), restricted
per variant by its mask kind (``joint`` = all prompt positions, ``image`` = the prompt's image
tokens, ``text`` = the others), and inside a per-token ball ‖δ_t‖ ≤ ρ‖z_t‖ relative to the clean
anchor's embedding norm (visual and text embeddings differ in scale).

:func:`pgd` finds, for all K variants at once (one K-row batch), the points of the ball where the
current patched model is least sure of the new answer (untargeted) or most sure of the old one
(targeted): a random start, then S normalised-gradient steps, each projected back onto the ball
and re-masked. The patch is never updated here (gradients are taken with respect to δ only) and
the result is detached. ``lar_mode: random`` draws random points in the same ball instead.
:func:`coherence` is the share of variants on which the unedited model's first answer token is
still its answer on the clean anchor.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mke_plugins.adapters import Batch, HookPoint, VLMAdapter
from mke_plugins.core.hooks import capture, intervene
from mke_plugins.core.wrap import gate_open


@dataclass
class LatentAnchor:
    """What LAR needs about the anchor: clean embedding norms and the per-variant masks."""

    z_norm: torch.Tensor  # (T,) fp32, detached ‖z_t‖ of the clean anchor
    masks: torch.Tensor  # (K, T) bool, variant k's positions
    image_as_text: bool  # the anchor has no image tokens: image masks became text masks
    d: int  # embedding width


def variant_masks(prompt_mask: torch.Tensor, image_mask: torch.Tensor, kinds: Sequence[str]
                  ) -> tuple[torch.Tensor, bool]:
    """(K, T) masks from one row's prompt mask P and image-token mask I; image → text when I ∩ P is empty."""
    p = prompt_mask.bool()
    img = image_mask.bool() & p
    txt = p & ~img
    no_image = not bool(img.any())
    rows = []
    for kind in kinds:
        if kind == "joint":
            rows.append(p)
        elif kind == "image":
            rows.append(txt if no_image else img)
        elif kind == "text":
            rows.append(txt)
        else:
            raise ValueError(f"lar_masks: unknown mask kind {kind!r}; use joint, image or text")
    return torch.stack(rows, dim=0), no_image


def clean_embeddings(model: Any, adapter: VLMAdapter, batch: Batch) -> torch.Tensor:
    """z: the embed-output sequence of row 0 of ``batch`` (T, d), detached (the gate is as the caller set it)."""
    with torch.no_grad(), capture(adapter.embed_output(model)) as rec:
        adapter.forward(model, batch)
    return rec[0][0].detach()


def anchor_info(model: Any, adapter: VLMAdapter, batch: Batch, kinds: Sequence[str]) -> LatentAnchor:
    z = clean_embeddings(model, adapter, batch)
    masks, no_image = variant_masks(batch.prompt_mask[0], adapter.image_token_mask(batch)[0], kinds)
    return LatentAnchor(z.float().norm(dim=-1), masks.to(z.device), no_image, int(z.shape[-1]))


@contextlib.contextmanager
def perturbed(point: HookPoint, delta: torch.Tensor) -> Iterator[None]:
    """Add ``delta`` (B, T, d), fp32 master copy, cast to the embedding dtype, at ``point`` for the block."""
    def add(x: torch.Tensor) -> torch.Tensor:
        if x.shape != delta.shape:
            raise RuntimeError(f"LAR: embed output has shape {tuple(x.shape)}, the perturbation "
                               f"{tuple(delta.shape)}; the adapter's embed_output point does not see the batch")
        return x + delta.to(x.dtype)

    with intervene(point, add):
        yield


def project(delta: torch.Tensor, anchor: LatentAnchor, rho: float) -> torch.Tensor:
    """Per-token projection onto ‖δ_t‖ ≤ ρ‖z_t‖, then zero outside each variant's mask."""
    radius = (rho * anchor.z_norm).view(1, -1, 1)
    norm = delta.norm(dim=-1, keepdim=True)
    scale = torch.clamp(radius / norm.clamp_min(1e-12), max=1.0)
    return delta * scale * anchor.masks.unsqueeze(-1).to(delta.dtype)


def random_start(anchor: LatentAnchor, d: int, rho: float, gen: torch.Generator) -> torch.Tensor:
    """Uniform direction per token, radius ξρ‖z_t‖ with ξ ~ U(0, 1) per token; masked. (K, T, d) fp32."""
    K, T = anchor.masks.shape
    u = torch.randn((K, T, d), generator=gen)
    u = u / u.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    xi = torch.rand((K, T, 1), generator=gen)
    dev = anchor.z_norm.device
    delta = u.to(dev) * xi.to(dev) * (rho * anchor.z_norm).view(1, -1, 1)
    return delta * anchor.masks.unsqueeze(-1).to(delta.dtype)


def pgd(model: Any, adapter: VLMAdapter, batch_k: Batch, anchor: LatentAnchor, *, rho: float, steps: int,
        alpha: float, gen: torch.Generator, gate: str, objective: str = "untargeted",
        old_labels: torch.Tensor | None = None, mode: str = "adversarial") -> torch.Tensor:
    """δ* for the K variants (K, T, d), detached. The patch is frozen: only δ gets gradients."""
    point = adapter.embed_output(model)
    delta = random_start(anchor, anchor.d, rho, gen)
    if mode == "random":
        return delta.detach()
    if objective == "targeted" and old_labels is None:
        raise ValueError("LAR targeted objective needs the pre-edit answer labels")
    step_len = (alpha * anchor.z_norm).view(1, -1, 1)
    for _ in range(int(steps)):
        delta = delta.detach().requires_grad_(True)
        with gate_open(model, gate), perturbed(point, delta):
            answers = adapter.answer_logits(model, batch_k)
        if objective == "untargeted":
            obj = answers.loss("row").sum()
        else:
            obj = -answers.with_labels(old_labels).loss("row").sum()
        (g,) = torch.autograd.grad(obj, delta)
        g = g / g.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        delta = project(delta.detach() + step_len * g, anchor, rho)
    return delta.detach()


def pre_edit_labels(logits: torch.Tensor, batch: Batch) -> torch.Tensor:
    """y_o as labels: the unedited model's top-1 token at every answer-predicting position (targeted LAR)."""
    pred = logits[:, :-1].argmax(-1)
    labels = batch.labels.clone()
    tgt = batch.labels[:, 1:] != -100
    labels[:, 1:][tgt] = pred[tgt.to(pred.device)].to(labels.device)
    return labels


def first_answer_position(batch: Batch) -> int:
    """p: row 0's last prompt position (its logits predict the first answer token)."""
    pos = batch.answer_positions()[0]
    if not pos:
        raise ValueError("the anchor batch has no answer positions (empty target?)")
    return int(pos[0])


def coherence(model: nn.Module, adapter: VLMAdapter, batch_k: Batch, delta: torch.Tensor, clean_top1: int,
              p: int) -> float:
    """Share of variants on which the unedited model's top-1 first answer token equals its clean answer."""
    with torch.no_grad(), perturbed(adapter.embed_output(model), delta):
        logits = adapter.forward(model, batch_k)
    top = logits[:, p].argmax(-1)
    return float((top == clean_top1).float().mean())
