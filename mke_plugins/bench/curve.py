"""The lifelong-editing curve of a sequential run: every metric after T edits, for each checkpoint T.

Why it exists: a method that edits well once may forget, slow down or grow as edits pile up.
In sequential mode the bench evaluates, at each checkpoint T, every edit made so far on the
current model (:class:`Checkpoint` per sequence; the Ts are :func:`curve_ts`). :func:`curve`
pools the sequences evaluated at T into one point: the case metrics averaged over their cases
(as the method row averages them); ``retention``, the reliability of the first ``min(100, T)``
edits of each sequence; ``cross_edit_count`` summed (``null`` when the data names no facts);
``edit_seconds_last10``, the median edit time of the last 10 edits before T, pooled over
sequences; ``edit_seconds_early``, the median edit time of edits 2-11 (the first edit pays
one-off costs: caches, lazy hooks), the baseline that the last-10 median is compared with to see
whether an edit slows down as edits pile up; ``held_bytes`` / ``held_edits``, the bytes the edits
made so far report adding to the model (the sum of their ``added_bytes``) and how many edits
report it, a mean over sequences (``null`` when no edit reports it).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

from mke_plugins.core import scoring

from .score import understood_columns

#: per-case metrics a curve point averages over the cases evaluated at T
CURVE_METRICS = ("rewrite_acc", "rewrite_success", "rephrase_acc", "image_rephrase_acc", "text_only_acc",
                 "image_only_acc", "locality_acc", "multimodal_locality_acc", "locality_easyedit",
                 "multimodal_locality_easyedit", "fine_locality_acc", "portability_acc", "cross_edit_consistency")
#: retention is the reliability of this many first edits of a sequence (fewer before T reaches it)
RETENTION_EDITS = 100
#: edit time at a checkpoint: median over this many last edits
LAST_EDITS = 10
#: the early edit time a checkpoint's is compared with: edits 2-11 (the first one is warm-up)
EARLY_EDITS = slice(1, 11)


@dataclass
class Checkpoint:
    """One sequence evaluated after its first ``T`` edits.

    ``cases``: the per-case scores of the ``T`` edits made, in edit order; ``seconds``: the edit
    time of each; ``added``: each edit's ``added_bytes`` (``None`` where the method reports none).
    """

    T: int
    cases: list[dict[str, Any]]
    seconds: list[float] = field(default_factory=list)
    added: list[float | None] = field(default_factory=list)


def curve_ts(requested: Sequence[int] | None, length: int) -> set[int]:
    """The Ts of the curve of ``length``-edit sequences: the requested checkpoints and the sequence end.

    A sequence is evaluated at each of them it reaches; a shorter last sequence (``--cases`` not a
    multiple of ``--sequential-n``) is also evaluated at its own end, for the method row only.
    """
    return set(requested or ()) | {length}


def curve(points: Sequence[Checkpoint]) -> list[dict[str, Any]]:
    """One ``{"T": int, metric: value, ...}`` per distinct T, pooling the sequences evaluated at T."""
    out = []
    for t in sorted({p.T for p in points}):
        group = [p for p in points if p.T == t]
        cases = [c for p in group for c in p.cases]
        row: dict[str, Any] = {"T": t, "n_sequences": len(group), "n_cases": len(cases)}
        row.update({k: scoring.mean_or_none([c.get(k) for c in cases]) for k in CURVE_METRICS})
        row.update(understood_columns(cases))
        row["retention"] = scoring.mean_or_none([c.get("rewrite_acc") for p in group
                                                 for c in p.cases[:RETENTION_EDITS]])
        checked = any(c.get("cross_edit_n") is not None for c in cases)  # else: no fact identities to check
        row["cross_edit_count"] = sum(int(c.get("cross_edit_n") or 0) for c in cases) if checked else None
        row["cross_edit_unscored"] = sum(int(c.get("cross_edit_unscored") or 0) for c in cases) if checked else None
        row["edit_seconds_last10"] = scoring.percentile([s for p in group for s in p.seconds[-LAST_EDITS:]], 50)
        row["edit_seconds_early"] = scoring.percentile([s for p in group for s in p.seconds[EARLY_EDITS]], 50)
        held = [[b for b in p.added if b is not None] for p in group]
        row["held_bytes"] = (sum(sum(h) for h in held) / len(held)) if any(held) else None
        row["held_edits"] = sum(len(h) for h in held) / len(held)
        out.append(row)
    return out
