"""Fast Localization against the causal traces on the same edits (spec §5 A4/A5 report).

For the first ``--edits`` edit requests (3 warm-up edits dropped), time the localization alone
with ``grad``, ``trace`` and ``full_trace`` on the same model and device, and report the median
seconds per edit, the ratios to ``grad``, forward-pass-equivalent counts, and how often each
trace picks the same top layer (and the same top-k set) as ``grad``; for context also Fast
Localization without the baseline mu (``layer_prior: none``)::

    python -m mke_plugins.methods.ldke.compare --edits 50 --json ldke-localization.json

Defaults: the bundled world model, its edit split and LDKE's ``world`` hyperparameters.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
from pathlib import Path
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


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m mke_plugins.methods.ldke.compare", description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=50, help="edit requests timed (first N; default 50)")
    p.add_argument("--warmup", type=int, default=3, help="first edits dropped from the medians (default 3)")
    p.add_argument("--hparams", default="world", help="LDKE hparams key or YAML path (default world)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, help="write the report here")
    args = p.parse_args(argv)
    import torch

    from mke_plugins import world
    from mke_plugins.hparams import load_hparams

    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    hp = load_hparams("LDKE", args.hparams, device=args.device)
    model, tok = world.load(device=args.device)
    requests = world.records("edit")[: args.edits + args.warmup]
    report = compare_localization(model, tok, requests, hp, warmup=args.warmup)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
