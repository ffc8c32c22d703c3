"""The one scorer every method is measured with: pure functions on logits, labels and flags.

Why a module of its own: `mke-plugins bench`, the method READMEs' acceptance numbers and the tests
must all count the same thing. Nothing here touches a model, an adapter or a file; callers pass
tensors and plain Python values, and these functions turn them into numbers.

Conventions (those of EasyEdit's multimodal evaluator and of :mod:`mke_plugins.adapters.base`):

* ``labels`` is ``(B, T)``, ``-100`` everywhere except the target tokens; ``logits[:, t]``
  predicts ``labels[:, t + 1]``. The *answer positions* of a row are the ``t`` with
  ``labels[t + 1] != -100``.
* **Token accuracy** is EasyEdit's ``rewrite_acc``: the share of a row's answer positions whose
  argmax equals the label. **Success** means every target token is the argmax (the same as greedy
  decoding that starts with the target). A row without target tokens has no accuracy (``nan``)
  and no success (``False``); callers treat it as "no metric".
* **Locality** compares the post-edit model's top-1 token with the PRE-edit model's top-1 token at
  the answer positions of the locality query (pre computed on the unedited model before the edit),
  never with the dataset answer. EasyEdit main's own M-Loc is a top-10 agreement, rank by rank,
  over the whole sequence; :func:`topk_agreement` computes it from the ids of both runs.
* **Decoupling** (success based): DFR_T = P(text-only fails | paired succeeds), DFR_I =
  P(image-only fails | paired succeeds), joint consistency = P(paired, text-only and image-only all
  succeed), over the cases that carry both optional prompts; ``None`` when there are none (and a
  DFR is ``None`` when no paired query succeeded).
* A metric the data cannot provide is ``None``, never a made-up number.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterable, Sequence

import torch

IGNORE_INDEX = -100


def _check(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or labels.dim() != 2 or logits.shape[:2] != labels.shape:
        raise ValueError(f"logits must be (B, T, V) and labels (B, T) with the same B, T; got "
                         f"{tuple(logits.shape)} and {tuple(labels.shape)}")


def shifted_hits(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(hits, mask)``, both ``(B, T-1)`` bool: argmax equals the next label, and where labels exist."""
    _check(logits, labels)
    pred = logits[:, :-1].argmax(-1)
    targ = labels[:, 1:].to(pred.device)
    mask = targ != IGNORE_INDEX
    return (pred == targ) & mask, mask


def token_accuracy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` float: EasyEdit's teacher-forced target-token accuracy per row (``nan`` without targets)."""
    hits, mask = shifted_hits(logits, labels)
    n = mask.sum(1).float()
    acc = hits.sum(1).float() / n.clamp_min(1.0)
    return torch.where(n > 0, acc, torch.full_like(acc, float("nan")))


def success(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """``(B,)`` bool: every target token of the row is the argmax (rows without targets: False)."""
    hits, mask = shifted_hits(logits, labels)
    return (hits == mask).all(1) & mask.any(1)


def answer_topk(logits: torch.Tensor, labels: torch.Tensor, k: int = 1) -> list[torch.Tensor]:
    """Per row, the top-``k`` token ids ``(n_answer, k)`` at its answer positions, in order (on CPU)."""
    _check(logits, labels)
    answer = torch.zeros_like(labels, dtype=torch.bool)
    answer[:, :-1] = labels[:, 1:] != IGNORE_INDEX
    k = min(k, logits.shape[-1])
    out = []
    for b in range(labels.shape[0]):
        rows = logits[b][answer[b].to(logits.device)]
        out.append(rows.float().topk(k, dim=-1).indices.cpu() if rows.numel() else
                   torch.zeros((0, k), dtype=torch.long))
    return out


def sequence_topk(logits: torch.Tensor, attention_mask: torch.Tensor, k: int = 10) -> list[torch.Tensor]:
    """Per row, the top-``k`` ids ``(n_tokens, k)`` at every non-padding position (EasyEdit's M-Loc input)."""
    if logits.dim() != 3 or attention_mask.shape != logits.shape[:2]:
        raise ValueError(f"logits (B, T, V) and attention_mask (B, T) do not match: {tuple(logits.shape)} "
                         f"vs {tuple(attention_mask.shape)}")
    k = min(k, logits.shape[-1])
    keep = attention_mask.bool().to(logits.device)
    return [logits[b][keep[b]].float().topk(k, dim=-1).indices.cpu() for b in range(logits.shape[0])]


def agreement(pre_ids: torch.Tensor, post_ids: torch.Tensor) -> float | None:
    """Share of equal entries of two id tensors of the same shape (``None`` when empty).

    With ``(n, 1)`` top-1 ids it is the locality of one query; with ``(n, k)`` top-k ids it is
    EasyEdit's rank-by-rank top-k match.
    """
    if pre_ids.shape != post_ids.shape:
        raise ValueError(f"pre and post ids differ in shape: {tuple(pre_ids.shape)} vs {tuple(post_ids.shape)}")
    if pre_ids.numel() == 0:
        return None
    return float((pre_ids == post_ids).float().mean())


def topk_agreement(pre_ids: torch.Tensor, post_ids: torch.Tensor) -> float | None:
    """EasyEdit main's ``topk_token_match`` on ids: align the trailing positions, compare rank by rank."""
    n = min(pre_ids.shape[0], post_ids.shape[0])
    if n == 0:
        return None
    return agreement(pre_ids[pre_ids.shape[0] - n:], post_ids[post_ids.shape[0] - n:])


# -- aggregation -------------------------------------------------------------------------------
def finite(x: float | None) -> float | None:
    """``x`` as a float, or ``None`` for ``None``/``nan``."""
    if x is None:
        return None
    x = float(x)
    return None if math.isnan(x) else x


def mean_or_none(values: Iterable[float | bool | None]) -> float | None:
    """Mean of the values that exist (``None``/``nan`` skipped); ``None`` when none exist."""
    vals = [float(v) for v in values if finite(v) is not None]
    return sum(vals) / len(vals) if vals else None


def all_or_none(flags: Sequence[bool | None]) -> bool | None:
    """True when every flag is True; ``None`` when the list is empty or any flag is missing."""
    if not flags or any(f is None for f in flags):
        return None
    return all(bool(f) for f in flags)


def percentile(values: Sequence[float], q: float) -> float | None:
    """The ``q``-th percentile (0-100) with linear interpolation (numpy's default); ``None`` if empty."""
    vals = sorted(float(v) for v in values)
    if not vals:
        return None
    if not 0 <= q <= 100:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    pos = (len(vals) - 1) * q / 100.0
    lo, hi = math.floor(pos), math.ceil(pos)
    return vals[lo] + (vals[hi] - vals[lo]) * (pos - lo)


@dataclass(frozen=True)
class Decoupling:
    """Success-based decoupling numbers over the cases carrying both unimodal prompts."""

    dfr_text: float | None
    dfr_image: float | None
    joint_consistency: float | None
    n: int  # cases with paired, text-only and image-only results
    n_paired_success: int  # of those, cases whose paired query succeeded

    def as_dict(self) -> dict[str, float | int | None]:
        return {"dfr_text": self.dfr_text, "dfr_image": self.dfr_image,
                "joint_consistency": self.joint_consistency, "decoupling_n": self.n,
                "decoupling_n_paired_success": self.n_paired_success}


def decoupling(paired: Sequence[bool | None], text_only: Sequence[bool | None],
               image_only: Sequence[bool | None]) -> Decoupling:
    """DFR_T, DFR_I and joint consistency from per-case success flags (``None`` = probe absent)."""
    if not len(paired) == len(text_only) == len(image_only):
        raise ValueError(f"per-case lists differ in length: {len(paired)}, {len(text_only)}, {len(image_only)}")
    rows = [(bool(p), bool(t), bool(i)) for p, t, i in zip(paired, text_only, image_only, strict=True)
            if p is not None and t is not None and i is not None]
    n = len(rows)
    hit = [r for r in rows if r[0]]
    dfr_t = sum(not t for _, t, _ in hit) / len(hit) if hit else None
    dfr_i = sum(not i for _, _, i in hit) / len(hit) if hit else None
    joint = sum(all(r) for r in rows) / n if n else None
    return Decoupling(dfr_t, dfr_i, joint, n, len(hit))
