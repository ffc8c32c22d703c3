"""Show bench results: a text table, the JSON file tools read, and a PNG of metrics per method.

A sequential run with checkpoints also gets a curve table and a second PNG (every metric against
the number of edits made, log x). Every method keeps one colour in every figure of every run
(:func:`method_colour`).

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
import zlib
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
    ("X-Edit", "cross_edit_consistency", "acc"),
    ("X-n", "cross_edit_count", "count"),
    ("Port", "portability_acc", "acc"),
    ("DFR_T", "dfr_text", "rate"),
    ("DFR_I", "dfr_image", "rate"),
    ("Joint", "joint_consistency", "acc"),
    ("s/edit", "edit_seconds_median", "sec"),
    ("p90", "edit_seconds_p90", "sec"),
    ("xFwdBwd", "edit_to_fwdbwd_ratio", "ratio"),
    ("PeakMB", "peak_memory_mb", "mb"),
)


#: the curve table and plot: (header, curve-point key, kind); kind as in COLUMNS, "bytes" held memory
CURVE_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("Rel", "rewrite_acc", "acc"),
    ("T-Gen", "rephrase_acc", "acc"),
    ("M-Gen", "image_rephrase_acc", "acc"),
    ("Text", "text_only_acc", "acc"),
    ("Image", "image_only_acc", "acc"),
    ("T-Loc", "locality_acc", "acc"),
    ("M-Loc", "multimodal_locality_acc", "acc"),
    ("T-Loc(EE)", "locality_easyedit", "acc"),
    ("M-Loc(EE)", "multimodal_locality_easyedit", "acc"),
    ("FineLoc", "fine_locality_acc", "acc"),
    ("X-Edit", "cross_edit_consistency", "acc"),
    ("X-n", "cross_edit_count", "count"),
    ("Port", "portability_acc", "acc"),
    ("Retain", "retention", "acc"),
    ("s/edit10", "edit_seconds_last10", "sec"),
    ("s/edit2-11", "edit_seconds_early", "sec"),
    ("Held", "held_bytes", "bytes"),
    ("HeldN", "held_edits", "count"),
)

#: one colour per known method, the same in every figure of every run (tab10's colours)
METHOD_COLOURS = {
    "FT": "#1f77b4", "LoRA": "#ff7f0e", "DECODE": "#2ca02c", "LDKE": "#d62728", "ASAM": "#9467bd",
    "UniKE": "#8c564b", "easyedit:WISE": "#e377c2", "easyedit:GRACE": "#bcbd22", "easyedit:LoRA": "#17becf",
    "easyedit:FT": "#7f7f7f",
}
#: colours for every other label (ablation rows, third-party methods), picked by a stable hash of the
#: label; none of them is a known method's colour (tab20b / tab20c)
OTHER_COLOURS = ("#393b79", "#637939", "#8c6d31", "#843c39", "#7b4173", "#3182bd", "#e6550d", "#31a354",
                 "#756bb1", "#636363", "#6b6ecf", "#b5cf6b", "#e7ba52", "#ad494a", "#a55194", "#9ecae1")


def method_colour(label: str) -> str:
    """The colour of method ``label``: fixed for the known methods, else a stable hash of the label
    (``zlib.crc32``, the same in every process; Python's ``hash`` of a string is not)."""
    return METHOD_COLOURS.get(label) or OTHER_COLOURS[zlib.crc32(label.encode("utf-8")) % len(OTHER_COLOURS)]


def _bytes(value: float) -> str:
    for unit, size in (("GB", 1 << 30), ("MB", 1 << 20), ("KB", 1 << 10)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return f"{value:.0f}B"


def _fmt(value: Any, kind: str) -> str:
    if value is None:
        return "n/a"
    if not isinstance(value, numbers.Real):
        return str(value)[:7]
    if not math.isfinite(value):
        return str(float(value))  # nan, inf, -inf
    if kind in ("acc", "rate"):
        return f"{value:.3f}"
    if kind == "count":
        return f"{value:.0f}" if float(value).is_integer() else f"{value:.1f}"
    if kind == "bytes":
        return _bytes(float(value))
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
    understood = [("T-Gen", "rephrase"), ("M-Gen", "image_rephrase"), ("Text", "text_only"), ("Image", "image_only")]
    if any(first.get(f"{k}_understood_share") is not None for _, k in understood):
        lines.append("Generality over the cases whose probe the unedited model answers with the original answer "
                     "(every token), share of such cases: "
                     + ", ".join(f"{h} {_fmt(first.get(k + '_understood_share'), 'acc')}" for h, k in understood))
        for name in names:
            row = result["methods"][name]
            lines.append(f"{name}, understood only: "
                         + ", ".join(f"{h} {_fmt(row.get(k + '_acc_understood'), 'acc')}" for h, k in understood))
    for name in names:
        row = result["methods"][name]
        if row.get("rewrite_acc_at_edit") is not None:  # sequential mode: EasyEdit's own protocol beside ours
            cols = [("Rel", "rewrite_acc"), ("T-Gen", "rephrase_acc"), ("M-Gen", "image_rephrase_acc"),
                    ("T-Loc(EE)", "locality_easyedit"), ("M-Loc(EE)", "multimodal_locality_easyedit")]
            lines.append(f"{name}, each edit scored right after it was made (EasyEdit's sequential_edit=True): "
                         + ", ".join(f"{h} {_fmt(row.get(k + '_at_edit'), 'acc')}" for h, k in cols))
    for note in result.get("notes") or []:
        lines.append(f"note: {note}")
    if has_curve(result):
        lines.append("")
        lines.append(curve_table(result))
    return "\n".join(lines)


def has_curve(result: dict[str, Any]) -> bool:
    """Whether some method has a curve of more than one checkpoint (sequential mode, ``--checkpoints``)."""
    return any(len(row.get("curve") or ()) > 1 for row in result.get("methods", {}).values())


def curve_table(result: dict[str, Any]) -> str:
    """Every curve metric at every checkpoint T, one block of rows per method."""
    cols = [max(7, len(h)) for h, _, _ in CURVE_COLUMNS]
    width = max([len("method")] + [len(n) for n in result["methods"]])
    header = (f"{'method':<{width}}  {'T':>6}  "
              + "  ".join(f"{h:>{w}}" for (h, _, _), w in zip(CURVE_COLUMNS, cols, strict=True)))
    lines = [header, "-" * len(header)]
    for name, row in result["methods"].items():
        for point in row.get("curve") or ():
            lines.append(f"{name:<{width}}  {point['T']:>6}  " + "  ".join(
                f"{_fmt(point.get(k), kind):>{w}}" for (_, k, kind), w in zip(CURVE_COLUMNS, cols, strict=True)))
    lines.append("curve: every edit made so far evaluated after T edits of one sequence order (teacher-forced); "
                 "Retain = Rel of the first min(100, T) edits; X-Edit = cross-edit consistency over X-n probes; "
                 "s/edit10 = median seconds of the last 10 edits, s/edit2-11 of edits 2-11; Held = bytes the edits "
                 "report adding (HeldN edits report it).")
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
            ax.bar(xs, ys, width=w, color=method_colour(name), label=name)
            for x, y in zip(xs, ys, strict=True):
                if y == 0:  # a zero bar is invisible; say it is a zero, not a missing value
                    ax.text(x, 0.01, "0", ha="center", va="bottom", fontsize=7, color=method_colour(name))
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
    ax.bar(range(len(names)), secs, color=[method_colour(n) for n in names],
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
    rows = _legend(fig, handles, labels)
    fig.tight_layout(rect=(0, 0.05 + 0.03 * rows, 1, 0.95))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def curve_path(plot_path: str | Path) -> Path:
    """Where the curve figure of ``--plot FILE`` goes: ``FILE`` with ``-curve`` before its suffix."""
    p = Path(plot_path)
    return p.with_name(f"{p.stem}-curve{p.suffix}")


def _legend(fig: Any, handles: list, labels: list[str]) -> int:
    """One legend under the panels, as many columns as the longest label lets fit; returns its rows."""
    width_chars = fig.get_figwidth() * 11  # about 11 legend characters per inch at the default font size
    ncol = max(1, min(len(labels), 6, int(width_chars // (max(map(len, labels), default=1) + 6))))
    fig.legend(handles, labels, loc="lower center", ncol=ncol, frameon=False)
    return -(-len(labels) // ncol)


def plot_curve(result: dict[str, Any], path: str | Path) -> Path:
    """Every curve metric against the checkpoint T (log x), one line per method in its own colour."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    result = finite_json(result)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # the edits 2-11 median is one baseline per sequence, not a curve: the table shows it beside the last-10 one
    panels = [c for c in CURVE_COLUMNS if c[2] != "count" and c[1] != "edit_seconds_early"]
    ncols = 4
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 3.1 * nrows), squeeze=False)
    ts = sorted({p["T"] for row in result["methods"].values() for p in row.get("curve") or ()})
    for ax, (head, key, kind) in zip(axes.flat, panels, strict=False):
        drawn = False
        for name, row in result["methods"].items():
            pts = [(p["T"], p.get(key)) for p in row.get("curve") or () if p.get(key) is not None]
            if not pts:
                continue
            xs, ys = zip(*pts, strict=True)
            ys = [y / (1 << 20) for y in ys] if kind == "bytes" else list(ys)
            ax.plot(xs, ys, marker="o", ms=3.5, color=method_colour(name), label=name)
            drawn = True
        if not drawn:
            ax.text(0.5, 0.5, "n/a (no probe or no method reports it)", transform=ax.transAxes, ha="center",
                    va="center", fontsize=8, color="grey")
        ax.set_xscale("log")
        ax.set_xticks(ts)
        ax.set_xticklabels([str(t) for t in ts], fontsize=8)
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_title({"bytes": f"{head} (MB held by the edits)", "sec": f"{head} (median s, last 10 edits)"}
                     .get(kind, head), fontsize=10)
        if kind == "acc":
            ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("edits made (T)", fontsize=8)
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(panels):]:
        ax.axis("off")
    handles = {name: plt.Line2D([], [], color=method_colour(name), marker="o", label=name)
               for name in result["methods"]}
    rows = _legend(fig, list(handles.values()), list(handles))
    fig.suptitle(f"mke-plugins bench: every edit made so far, after T sequential edits ({result['cases']} cases; "
                 f"model {Path(result['model']).name})", fontsize=11)
    fig.tight_layout(rect=(0, 0.015 + 0.018 * rows, 1, 0.96))
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
