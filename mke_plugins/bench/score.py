"""Per-case metrics from the pre- and post-edit probe outputs, and their per-method aggregate.

Every number comes from :mod:`mke_plugins.core.scoring`; this module only decides which probe
feeds which metric (see the world README, "Record fields and what they measure"):

* ``rewrite`` / ``rephrase`` / ``image_rephrase`` / ``text_only`` / ``image_only`` /
  ``portability``: post-edit token accuracy against the probe's target (``*_acc``) and success
  (``*_success``: every target token argmax-correct); the same on the unedited model as ``pre_*``.
* ``locality`` / ``multimodal_locality`` / ``fine_locality``: share of answer positions whose
  post-edit top-1 token equals the pre-edit top-1 token (``*_acc``, our protocol).
* EasyEdit main's protocol for the same two probes (``MultimodalEditor``'s
  ``attach_topk_locality_metrics``): every position of the row (prompt, picture tokens, answer),
  top-1 for ``locality_easyedit``, top-10 rank by rank for ``multimodal_locality_easyedit``
  (also kept under its older name ``multimodal_locality_top10``).
* ``unit_consistency``: anchor, T-Gen and M-Gen all succeed (ASAM's UC).
* Decoupling (DFR_T, DFR_I, joint consistency) is aggregated from the per-case success flags.
* ``cross_edit_consistency`` (sequential mode, :mod:`.collisions`): probes of a case whose fact
  another edit of the sequence changed, scored against the newest edited answer; averaged per
  case, then over the cases that have one; ``cross_edit_count`` sums the probes scored.

A metric whose probe the case does not carry is ``None``.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import Any, Iterable, Sequence

from mke_plugins.core import scoring

from .probes import GENERALITY_KINDS, Probe, ProbeOutput

ACCURACY_KINDS = ("rewrite", "rephrase", "image_rephrase", "text_only", "image_only")

#: the result-schema keys every method row carries (the JSON schema in ``mke_plugins/bench/__init__.py``)
SCHEMA_KEYS = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc",
               "locality_easyedit", "multimodal_locality_easyedit", "text_only_acc", "image_only_acc",
               "fine_locality_acc", "portability_acc", "dfr_text", "dfr_image",
               "joint_consistency", "edit_seconds_median", "edit_seconds_p90", "edit_to_fwdbwd_ratio",
               "peak_memory_mb")
#: per-case keys averaged over cases into the method row (beside the schema's accuracy keys)
CASE_MEAN_KEYS = (
    "rewrite_acc", "rewrite_success", "rephrase_acc", "rephrase_success", "image_rephrase_acc",
    "image_rephrase_success", "locality_acc", "multimodal_locality_acc", "locality_easyedit",
    "multimodal_locality_easyedit", "multimodal_locality_top10",
    "text_only_acc", "text_only_success", "image_only_acc", "image_only_success", "fine_locality_acc",
    "fine_locality_same_image", "fine_locality_same_entity", "portability_acc", "portability_success",
    "unit_consistency", "rewrite_exact_match",
    "pre_rewrite_acc", "pre_rewrite_success", "pre_rephrase_acc", "pre_image_rephrase_acc", "pre_text_only_acc",
    "pre_image_only_acc", "pre_portability_acc", "cross_edit_consistency", "cross_edit_success",
)

#: EasyEdit's sequential protocol (``MultimodalEditor.edit(sequential_edit=True)``): each case scored
#: right after its own edit, on the model holding every edit made so far (sequential mode only)
AT_EDIT_KEYS = ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_easyedit",
                "multimodal_locality_easyedit")


def _mean(values: Iterable[float | bool | None]) -> float | None:
    return scoring.mean_or_none(list(values))


def _easyedit_locality(pre: ProbeOutput, post: ProbeOutput) -> float | None:
    """EasyEdit's locality of one probe: rank-by-rank agreement of the whole-row top-k ids."""
    if pre.seq_topk is None or post.seq_topk is None:
        return None
    return scoring.topk_agreement(pre.seq_topk, post.seq_topk)


def score_case(probes: Sequence[Probe], pre: Sequence[ProbeOutput], post: Sequence[ProbeOutput]) -> dict[str, Any]:
    """The metrics of one case (``None`` where the case has no probe for them)."""
    if not len(probes) == len(pre) == len(post):
        raise ValueError(f"probes, pre and post differ in length: {len(probes)}, {len(pre)}, {len(post)}")
    rows: dict[str, list[tuple[Probe, ProbeOutput, ProbeOutput]]] = defaultdict(list)
    for p, a, b in zip(probes, pre, post, strict=True):
        rows[p.kind].append((p, a, b))
    out: dict[str, Any] = {}
    for kind in ACCURACY_KINDS:
        if rows[kind]:
            _, a, b = rows[kind][0]
            out.update({f"{kind}_acc": b.acc, f"{kind}_success": b.success,
                        f"pre_{kind}_acc": a.acc, f"pre_{kind}_success": a.success})
        else:
            out.update({f"{kind}_acc": None, f"{kind}_success": None,
                        f"pre_{kind}_acc": None, f"pre_{kind}_success": None})
    port = rows["portability"]
    out["portability_acc"] = _mean(b.acc for _, _, b in port)
    out["portability_success"] = _mean(b.success for _, _, b in port)
    out["pre_portability_acc"] = _mean(a.acc for _, a, _ in port)
    out["portability_n"] = len(port)

    for kind in ("locality", "multimodal_locality"):
        if rows[kind]:
            _, a, b = rows[kind][0]
            out[f"{kind}_acc"] = scoring.agreement(a.top1, b.top1)
            out[f"{kind}_easyedit"] = _easyedit_locality(a, b)
        else:
            out[f"{kind}_acc"] = out[f"{kind}_easyedit"] = None
    out["multimodal_locality_top10"] = out["multimodal_locality_easyedit"]
    fine = [(p, scoring.agreement(a.top1, b.top1)) for p, a, b in rows["fine_locality"]]
    out["fine_locality_acc"] = _mean(v for _, v in fine)
    for scope in ("same_image", "same_entity"):
        out[f"fine_locality_{scope}"] = _mean(v for p, v in fine if p.tags[0] == scope)
    forms = sorted({p.tags[1] for p, _ in fine if len(p.tags) > 1 and p.tags[1]})
    out["fine_locality_by_form"] = {f: _mean(v for p, v in fine if p.tags[1] == f) for f in forms}
    out["fine_locality_n"] = len(fine)
    if out["rephrase_success"] is None or out["image_rephrase_success"] is None:
        out["unit_consistency"] = None
    else:
        out["unit_consistency"] = scoring.all_or_none(
            [out["rewrite_success"], out["rephrase_success"], out["image_rephrase_success"]])
    return out


def _numbers(values: Iterable[Any]) -> list[float]:
    return [float(v) for v in values if isinstance(v, (int, float)) and not isinstance(v, bool)]


def aggregate_extra(extras: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Per-method summary of the stats methods attach: numbers averaged, labels counted."""
    keys = list(dict.fromkeys(k for e in extras for k in e))
    out: dict[str, Any] = {}
    for k in keys:
        vals = [e[k] for e in extras if k in e]
        nums = _numbers(vals)
        if nums and len(nums) == len(vals):
            out[k] = sum(nums) / len(nums)
        elif all(isinstance(v, (str, bool)) for v in vals):
            out[k] = dict(Counter(str(v) for v in vals))
    return out


def aggregate(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """The method row from its per-case results (metrics, decoupling and cost)."""
    row: dict[str, Any] = {k: _mean(c.get(k) for c in cases) for k in CASE_MEAN_KEYS}
    for k in (f"{key}_at_edit" for key in AT_EDIT_KEYS):
        if any(k in c for c in cases):
            row[k] = _mean(c.get(k) for c in cases)
    dec = scoring.decoupling([c.get("rewrite_success") for c in cases],
                             [c.get("text_only_success") for c in cases],
                             [c.get("image_only_success") for c in cases])
    row.update(dec.as_dict())
    forms = sorted({f for c in cases for f in (c.get("fine_locality_by_form") or {})})
    row["fine_locality_by_form"] = {f: _mean((c.get("fine_locality_by_form") or {}).get(f) for c in cases)
                                    for f in forms}
    seconds = _numbers(c.get("edit_seconds") for c in cases)
    fwdbwd = _numbers(c.get("fwdbwd_seconds") for c in cases)
    row["edit_seconds_median"] = scoring.percentile(seconds, 50)
    row["edit_seconds_p90"] = scoring.percentile(seconds, 90)
    fb = scoring.percentile(fwdbwd, 50)
    row["fwdbwd_seconds_median"] = fb
    row["edit_to_fwdbwd_ratio"] = (row["edit_seconds_median"] / fb
                                   if row["edit_seconds_median"] is not None and fb else None)
    peaks = _numbers(c.get("peak_memory_mb") for c in cases)
    deltas = _numbers(c.get("peak_memory_delta_mb") for c in cases)
    row["peak_memory_mb"] = max(peaks) if peaks else None
    row["peak_memory_delta_mb"] = max(deltas) if deltas else None
    row["n_cases"] = len(cases)
    # None: single mode, or no probe could be checked (the data names no facts)
    sequential = any(c.get("cross_edit_n") is not None for c in cases)
    row["cross_edit_count"] = sum(int(c.get("cross_edit_n") or 0) for c in cases) if sequential else None
    row["cross_edit_unscored"] = sum(int(c.get("cross_edit_unscored") or 0) for c in cases) if sequential else None
    for key in ("portability_acc", "fine_locality_acc", "locality_acc", "multimodal_locality_acc",
                "rephrase_acc", "image_rephrase_acc", "text_only_acc", "image_only_acc"):
        row[f"{key.removesuffix('_acc')}_cases"] = sum(c.get(key) is not None for c in cases)
    row.update(understood_columns(cases))
    row["extra"] = aggregate_extra([c.get("extra") or {} for c in cases])
    return row


def understood_columns(cases: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Generality over the cases whose probe the unedited model answers with the fact's original answer
    (``*_acc_understood``), and the share of such cases (``*_understood_share``); ``None`` where no
    case says (the records carry no original answer)."""
    out: dict[str, Any] = {}
    for kind in GENERALITY_KINDS:
        flags = [c.get(f"{kind}_understood") for c in cases]
        out[f"{kind}_acc_understood"] = _mean(c.get(f"{kind}_acc") for c, f in zip(cases, flags, strict=True)
                                              if f is True)
        out[f"{kind}_understood_share"] = _mean(f for f in flags if f is not None)
    return out
