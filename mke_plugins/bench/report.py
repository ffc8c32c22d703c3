"""Show bench results: a text table, the JSON file tools read, and a PNG of metrics per method.

The JSON keeps the bench's result schema (``model``, ``data``, ``mode``, ``cases`` and per method the
keys in :data:`mke_plugins.bench.score.SCHEMA_KEYS`, accuracies in [0, 1], ``null`` where the
data has no probe for a metric) plus extra keys. JSON has no ``inf`` / ``nan``: :func:`finite_json`
writes them as ``null`` (the table prints them as ``inf`` / ``nan``), so a run whose numbers blew
up is still saved, and the file stays strict JSON (``allow_nan=False``).
"""

from __future__ import annotations

import json
import math
import numbers
from pathlib import Path
from typing import Any

#: (column header, result key, kind) for the table and the plot; kind: "acc" higher is better,
#: "rate" lower is better, "sec", "ratio", "mb". T-Loc and M-Loc are ours (answer positions, top-1);
#: the "(EE)" columns score the same probes the way EasyEdit main's MultimodalEditor does (every
#: position of the row, top-1 for T-Loc, top-10 rank by rank for M-Loc)
COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Rel", "rewrite_acc", "acc"),
    ("Rel-S", "rewrite_success", "acc"),
    ("T-Gen", "rephrase_acc", "acc"),
    ("M-Gen", "image_rephrase_acc", "acc"),
    ("T-Loc", "locality_acc", "acc"),
    ("M-Loc", "multimodal_locality_acc", "acc"),
    ("T-Loc(EE)", "locality_easyedit", "acc"),
    ("M-Loc(EE)", "multimodal_locality_easyedit", "acc"),
    ("Text", "text_only_acc", "acc"),
    ("Image", "image_only_acc", "acc"),
    ("FineLoc", "fine_locality_acc", "acc"),
    ("Port", "portability_acc", "acc"),
    ("DFR_T", "dfr_text", "rate"),
    ("DFR_I", "dfr_image", "rate"),
    ("Joint", "joint_consistency", "acc"),
    ("s/edit", "edit_seconds_median", "sec"),
    ("p90", "edit_seconds_p90", "sec"),
    ("xFwdBwd", "edit_to_fwdbwd_ratio", "ratio"),
    ("PeakMB", "peak_memory_mb", "mb"),
)


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, numbers.Real):
        return str(value)[:7]
    if not math.isfinite(value):
        return str(float(value))  # nan, inf, -inf
    if kind in ("acc", "rate"):
        return f"{value:.3f}"
    if kind == "sec":
        return f"{value:.3f}" if value < 10 else f"{value:.1f}"
    if kind == "ratio":
        return f"{value:.1f}"
    return f"{value:.0f}"


def table(result: dict[str, Any]) -> str:
    """A fixed-width table: one row per method, the main metrics as columns."""
    names = list(result["methods"])
    width = max([len("method")] + [len(n) for n in names])
    cols = [max(7, len(h)) for h, _, _ in COLUMNS]
    header = f"{'method':<{width}}  " + "  ".join(f"{h:>{w}}" for (h, _, _), w in zip(COLUMNS, cols, strict=True))
    lines = [header, "-" * len(header)]
    for name in names:
        row = result["methods"][name]
        lines.append(f"{name:<{width}}  " + "  ".join(f"{_fmt(row.get(k), kind):>{w}}"
                                                      for (_, k, kind), w in zip(COLUMNS, cols, strict=True)))
    seq = f", sequences of {result['sequential_n']}" if result.get("mode") == "sequential" else ""
    first = next(iter(result["methods"].values()), {})
    n = first.get("decoupling_n")
    lines.append(f"{result['cases']} cases, {result['mode']} mode{seq}; model {result['model']}; data "
                 f"{result['data']}; decoupling over N={n} cases. Accuracies are teacher-forced target-token "
                 f"accuracy; T-Loc/M-Loc = agreement with the unedited model's top-1 at the answer positions; "
                 f"(EE) = EasyEdit's protocol: every position, top-1 (T) / top-10 rank by rank (M); "
                 f"DFR/Joint success-based.")
    for note in result.get("notes") or []:
        lines.append(f"note: {note}")
    return "\n".join(lines)


def finite_json(obj: Any) -> Any:
    """``obj`` with every ``inf`` / ``nan`` float (at any depth of dicts, lists, tuples) replaced by None."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: finite_json(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [finite_json(v) for v in obj]
    return obj


def write_json(result: dict[str, Any], path: str | Path) -> Path:
    """Write ``result`` as strict JSON; non-finite numbers become ``null``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(finite_json(result), indent=2, allow_nan=False) + "\n")
    return path


def plot(result: dict[str, Any], path: str | Path) -> Path:
    """Grouped bars: quality metrics (higher is better), failure rates (lower), seconds per edit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    result = finite_json(result)  # inf / nan are drawn as n/a, like missing values
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    names = list(result["methods"])
    rows = [result["methods"][n] for n in names]
    quality = [(h, k) for h, k, kind in COLUMNS if kind == "acc"]
    rates = [(h, k) for h, k, kind in COLUMNS if kind == "rate"]
    cmap = plt.get_cmap("tab10")
    fig, axes = plt.subplots(1, 3, figsize=(19, 5.2), gridspec_kw={"width_ratios": [7, 1.4, 1.6]})

    def bars(ax, items, ylim=(0, 1.05)):
        n = max(len(names), 1)
        w = 0.8 / n
        for j, (name, row) in enumerate(zip(names, rows, strict=True)):
            xs, ys, missing = [], [], []
            for i, (_, key) in enumerate(items):
                x = i - 0.4 + w * (j + 0.5)
                if row.get(key) is None:
                    missing.append(x)
                else:
                    xs.append(x)
                    ys.append(row[key])
            ax.bar(xs, ys, width=w, color=cmap(j % 10), label=name)
            for x, y in zip(xs, ys, strict=True):
                if y == 0:  # a zero bar is invisible; say it is a zero, not a missing value
                    ax.text(x, 0.01, "0", ha="center", va="bottom", fontsize=7, color=cmap(j % 10))
            for x in missing:
                ax.text(x, 0.01, "n/a", rotation=90, ha="center", va="bottom", fontsize=7, color="grey")
        ax.set_xticks(range(len(items)))
        ax.set_xticklabels([h for h, _ in items], rotation=30, ha="right")
        ax.set_ylim(*ylim)
        ax.grid(axis="y", alpha=0.3)

    bars(axes[0], quality)
    axes[0].set_title("Quality (higher is better)")
    axes[0].set_ylabel("share")
    bars(axes[1], rates)
    axes[1].set_title("Decoupling failure\n(lower is better)")
    secs = [r.get("edit_seconds_median") or 0.0 for r in rows]
    p90 = [r.get("edit_seconds_p90") or 0.0 for r in rows]
    ax = axes[2]
    ax.bar(range(len(names)), secs, color=[cmap(j % 10) for j in range(len(names))],
           yerr=[[0] * len(names), [max(0.0, b - a) for a, b in zip(secs, p90, strict=True)]], capsize=3)
    for j, r in enumerate(rows):
        ratio = r.get("edit_to_fwdbwd_ratio")
        if ratio is not None:
            label = f"{ratio:.1f}x" if ratio < 10 else f"{ratio:.0f}x"
            ax.text(j, max(secs[j], p90[j]) * 1.02, label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=30, ha="right")
    ax.set_title("Seconds per edit\n(median, p90; label: x fwd+bwd)")
    ax.set_ylim(0, max(p90 + secs + [1e-3]) * 1.15)
    ax.grid(axis="y", alpha=0.3)
    seq = f", N={result['sequential_n']}" if result.get("mode") == "sequential" else ""
    fig.suptitle(f"mke-plugins bench: {result['cases']} cases, {result['mode']}{seq}; model "
                 f"{Path(result['model']).name}", fontsize=11)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=min(len(names), 6), frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
