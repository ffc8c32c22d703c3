"""Fast Localization against the causal traces on the same edits (README, "Localization cost").

For the given edit requests (the first ``warmup`` dropped), time the localization alone with
``grad``, ``trace`` and ``full_trace`` on the same model and device, and report the median
seconds per edit, the ratios to ``grad``, forward-pass-equivalent counts, and how often each
trace picks the same top layer (and the same top-k set) as ``grad``; for context also Fast
Localization without the baseline mu (``layer_prior: none``). The command that runs it on the
bundled world lives with the bench, since a method does not import the world::

    python -m mke_plugins.bench.localization --edits 50 --json ldke-localization.json
"""

from __future__ import annotations

import copy
import statistics
from typing import Any, Sequence

METHODS = ("grad", "trace", "full_trace")
#: extra rows: Fast Localization without the baseline mu (s_l / ||W_l||_F), for context
VARIANTS = ("grad_no_prior",)


def compare_localization(model: Any, tok: Any, requests: Sequence[dict[str, Any]], hparams: Any, *,
                         warmup: int = 3, progress: bool = True) -> dict[str, Any]:
    """Per-method median time, ratios to ``grad`` and top-layer agreement over ``requests``."""
    from tqdm.auto import tqdm

    from mke_plugins.adapters import get_adapter
    from mke_plugins.core.requests import query_of

    from .edit import archive_for
    from .localize import localize
    from .router import archive_mu

    adapter = get_adapter(model, hparams)
    mu = archive_mu(archive_for(hparams), len(adapter.layers(model))) if hparams.layer_prior == "archive" else None
    no_prior = copy.copy(hparams)
    no_prior.layer_prior = "none"
    rows: list[dict[str, Any]] = []
    for i, req in enumerate(tqdm(list(requests), desc="localization", disable=not progress)):
        batch = adapter.batch(model, tok, [query_of(req)])
        row: dict[str, Any] = {"index": i}
        for m in METHODS:
            loc = localize(adapter, model, tok, batch, hparams, mu, method=m)
            row[m] = {"seconds": loc.seconds, "layers": loc.layers, "fwd": loc.forward_equivalents}
        loc = localize(adapter, model, tok, batch, no_prior, None, method="grad")
        row["grad_no_prior"] = {"seconds": loc.seconds, "layers": loc.layers, "fwd": loc.forward_equivalents}
        rows.append(row)
        del batch
    kept = rows[warmup:] if len(rows) > warmup else rows
    med = {m: statistics.median(r[m]["seconds"] for r in kept) for m in METHODS}
    out: dict[str, Any] = {
        "edits": len(kept), "warmup_dropped": len(rows) - len(kept), "device": str(next(model.parameters()).device),
        "top_k": hparams.top_k, "median_seconds": med,
        "ratio_to_grad": {m: med[m] / med["grad"] for m in METHODS},
        "forward_equivalents": {m: statistics.median(r[m]["fwd"] for r in kept) for m in METHODS},
        "same_top_layer_as_grad": {m: sum(r[m]["layers"][0] == r["grad"]["layers"][0] for r in kept) / len(kept)
                                   for m in METHODS[1:] + VARIANTS},
        "same_topk_set_as_grad": {m: sum(set(r[m]["layers"]) == set(r["grad"]["layers"]) for r in kept) / len(kept)
                                  for m in METHODS[1:] + VARIANTS},
        "same_top_layer_as_full_trace": {m: sum(r[m]["layers"][0] == r["full_trace"]["layers"][0] for r in kept)
                                         / len(kept) for m in ("grad", "trace") + VARIANTS},
        "top_layer_histogram": {m: _hist(r[m]["layers"][0] for r in kept) for m in METHODS + VARIANTS},
    }
    return out


def _hist(values: Any) -> dict[str, int]:
    h: dict[str, int] = {}
    for v in values:
        h[str(v)] = h.get(str(v), 0) + 1
    return dict(sorted(h.items()))
