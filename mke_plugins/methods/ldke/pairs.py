"""Memory-scale training of the Disentanglement Classifier (``objective: pairs``; README, "Lifelong mode").

Why this exists: the ``trainer`` objective (EasyEdit's ``MultimodalTrainer`` loop) scores each training
input against its own record's key only, with a few sampled negatives, and calibrates tau on those
pairs. An edited model routes every input against *every* key of its memory, so a false-positive rate
of a few percent per pair compounds over hundreds of sequential edits (README, "Sequential"). This
objective trains the same head for that use:

* every training input is scored against every training key: it is a positive for the keys whose
  record lists it as a positive (its own edit's rephrasings, other picture, text-only and image-only
  forms) and a negative for every other key (other facts of the same entity, the same question about
  other entities, unrelated facts); an input has one own key and many others, so a positive pair
  weighs ``pair_positive_weight`` times the number of keys;
* the base model is frozen, so each input's features are computed once and the fit runs on them;
* the head kept is the one with the best validation routing, and tau is calibrated by routing the
  validation inputs over the whole validation memory as the edited model does (best key, then the
  threshold): a positive counts when it reaches its own key, a negative when it reaches none.
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from mke_plugins.adapters.base import Query

from .data import RoutingRecord
from .router import RouterHead, balanced_accuracy, calibrate_threshold, rates


def _query_id(q: Query) -> tuple[Any, ...]:
    """One input's identity: its prompt and its picture (a path, or the loaded object itself)."""
    img = q.image
    return (q.prompt, None if img is None else img if isinstance(img, (str, Path)) else id(img))


class PairSet:
    """The distinct inputs of some routing records, their features, and which keys each one belongs to."""

    def __init__(self, records: Sequence[RoutingRecord], phi: Any) -> None:
        index: dict[tuple[Any, ...], int] = {}
        queries: list[Query] = []
        kinds: list[str] = []

        def add(q: Query, kind: str) -> int:
            qid = _query_id(q)
            if qid not in index:
                index[qid] = len(queries)
                queries.append(q)
                kinds.append(kind)
            elif kind == "positive" or (kind == "hard" and kinds[index[qid]] == "easy"):
                kinds[index[qid]] = kind
            return index[qid]

        owners: list[tuple[int, int]] = []  # (input, key record)
        self.keys = []
        for r, rec in enumerate(records):
            self.keys.append(add(rec.key, "positive"))
            owners += [(add(q, "positive"), r) for q in [rec.key, *rec.positives, *rec.image_positives]]
        for rec in records:
            for kind, group in (("hard", rec.hard), ("easy", rec.easy)):
                for q in group:
                    add(q, kind)
        self.kinds = kinds
        self.x = phi(queries).float()  # (N, feature_dim)
        self.y = torch.zeros(len(queries), len(records), dtype=torch.bool)  # input i belongs to key r
        for i, r in owners:
            self.y[i, r] = True

    def __len__(self) -> int:
        return int(self.x.shape[0])


def pair_logits(head: RouterHead, x: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """(n, m) head logits of n inputs against m keys."""
    u, w = head.project(x), head.project(keys)
    n, m = u.shape[0], w.shape[0]
    return head.logit(u.repeat_interleave(m, 0), w.repeat(n, 1)).view(n, m)


def memory_routing(head: RouterHead, data: PairSet, chunk: int = 256) -> tuple[torch.Tensor, torch.Tensor]:
    """``(best score, whether the best key is the input's own)`` per input, over the whole memory."""
    keys = data.x[data.keys]
    best, own = [], []
    with torch.no_grad():
        for i in range(0, len(data), chunk):
            s = torch.sigmoid(pair_logits(head, data.x[i:i + chunk], keys))
            v, j = s.max(1)
            best.append(v)
            own.append(data.y[i:i + chunk].gather(1, j.unsqueeze(1)).squeeze(1))
    return torch.cat(best), torch.cat(own)


def routing_rates(head: RouterHead, data: PairSet, tau: float | None = None) -> dict[str, Any]:
    """Memory routing on ``data``: positives reaching their own key, negatives reaching any key, and
    their balanced accuracy, at ``tau`` or (None) at the best grid value (ties: closest to 0.5)."""
    best, own = memory_routing(head, data)
    # a positive routed to another key counts as not routed: its score is below every threshold
    reached = torch.where(own, best, torch.full_like(best, -1.0))
    by_kind = {kind: [float(v) for v, k in zip(reached if kind == "positive" else best, data.kinds, strict=True)
                      if k == kind] for kind in ("positive", "hard", "easy")}
    negatives = by_kind["hard"] + by_kind["easy"]
    if tau is None:
        tau, bacc = calibrate_threshold(by_kind["positive"], negatives)
    else:
        bacc = balanced_accuracy(by_kind["positive"], negatives, tau)
    shares = rates(by_kind["positive"], by_kind["hard"], by_kind["easy"], tau)
    return {"tau": float(tau), "balanced_accuracy": bacc, "rate/positive": shares["positive"],
            "rate/hard_negative": shares["hard_negative"], "rate/easy_negative": shares["easy_negative"],
            "rate/balanced_accuracy": bacc, "memory": len(data.keys)}


def fit_pairs(head: RouterHead, train: PairSet, val: PairSet, hp: Any, *, progress: bool = True
              ) -> tuple[list[dict[str, Any]], int]:
    """Train ``head`` on every (input, key) pair of ``train``; keep the best head on ``val``.

    Returns the validation history and the step of the head kept (it is loaded into ``head``).
    """
    from tqdm.auto import tqdm

    gen = torch.Generator().manual_seed(int(hp.seed))
    opt = torch.optim.AdamW(head.parameters(), lr=hp.lr, weight_decay=hp.pair_weight_decay)
    keys = train.x[train.keys]
    pos_weight = float(hp.pair_positive_weight) * len(train.keys)  # vs one negative pair
    steps = int(hp.pair_steps)
    every = max(1, steps // 10)
    history: list[dict[str, Any]] = []
    best: tuple[float, int, dict[str, torch.Tensor]] | None = None
    head.train()
    for step in tqdm(range(1, steps + 1), desc="LDKE router (pairs)", disable=not progress, dynamic_ncols=True):
        for group in opt.param_groups:
            group["lr"] = hp.lr * 0.5 * (1.0 + math.cos(math.pi * (step - 1) / steps))
        rows = torch.randint(len(train), (int(hp.pair_batch),), generator=gen)
        z, y = pair_logits(head, train.x[rows], keys), train.y[rows].float()
        loss = F.binary_cross_entropy_with_logits(z, y, weight=1.0 + y * pos_weight)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if step % every == 0 or step == steps:
            head.eval()
            result = routing_rates(head, val)
            head.train()
            history.append({"step": step, "loss": float(loss.detach()), **result})
            if best is None or result["balanced_accuracy"] >= best[0]:  # ties: the later head
                kept = {k: v.detach().clone() for k, v in head.state_dict().items()}
                best = (result["balanced_accuracy"], step, kept)
    assert best is not None
    head.load_state_dict(best[2])
    head.eval()
    return history, best[1]


def train_pairs(trainable: Any, train_recs: Sequence[RoutingRecord], val_recs: Sequence[RoutingRecord], hp: Any, *,
                progress: bool = True) -> dict[str, Any]:
    """The ``pairs`` objective on an ``LDKERouterTrainable``: mu from the training keys, the head fit,
    tau calibrated on validation memory routing. Returns the archive's ``meta`` entries."""
    t0 = time.perf_counter()
    trainable.accumulate_mu([r.key for r in train_recs][:int(hp.prior_edits)], chunk=int(hp.batch_size))
    train = PairSet(train_recs, trainable.phi)
    val = PairSet(val_recs, trainable.phi)
    history, kept = fit_pairs(trainable.head, train, val, hp, progress=progress)
    result = routing_rates(trainable.head, val)
    trainable.tau = float(result["tau"])
    trainable.val_rates = result
    return {"trainer": "pairs", "steps": int(hp.pair_steps), "best_step": kept, "train_inputs": len(train),
            "train_keys": len(train.keys), "val_inputs": len(val), "val_keys": len(val.keys),
            "seconds": time.perf_counter() - t0, "history": history}
