"""``mke-plugins bench``: every method measured the same way, on the same cases, by one scorer.

Why it exists: the methods in this package make claims (decoupling, generality, locality,
portability, cost) that only mean something against baselines measured identically. The bench
runs any registered method (ours, the FT/LoRA baselines, third-party plugins) through the same
EasyEdit-facing apply wrapper EasyEdit uses, and EasyEdit's own methods as ``easyedit:NAME``.

Layout: :mod:`.data` and :mod:`.formats` (benchmark records → requests with family-native
images: the world, MMEdit E-VQA/E-IC, VLKEB, MMKE-Bench, ComprehendEdit), :mod:`.probes`
(the probe queries of a case, batched evaluation), :mod:`.score` (per-case and per-method
metrics from :mod:`mke_plugins.core.scoring`), :mod:`.cost` (time, memory, fwd+bwd unit),
:mod:`.restore` (EasyEdit's restore rules, bit-exact check), :mod:`.methods` (method strings,
ablation overrides, binding), :mod:`.runner` (single and sequential protocols, units of work),
:mod:`.dist` (ranks under torchrun / accelerate launch), :mod:`.resume` (the per-rank JSONL and
``--resume``), :mod:`.report` (table, JSON, plot), :mod:`.cli`.

Result JSON (read by tools; these keys are stable)::

    {"model": str, "data": str, "mode": "single"|"sequential", "cases": int,
     "methods": {NAME: {"rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc",
                        "multimodal_locality_acc", "locality_easyedit", "multimodal_locality_easyedit",
                        "text_only_acc", "image_only_acc",
                        "fine_locality_acc", "portability_acc", "dfr_text", "dfr_image",
                        "joint_consistency", "edit_seconds_median", "edit_seconds_p90",
                        "edit_to_fwdbwd_ratio", "peak_memory_mb", ...extras}}}

Accuracies are in [0, 1]; a metric the data cannot provide is ``null``. Locality comes in two
protocols, both against the unedited model's outputs on the same inputs: ours, ``locality_acc`` /
``multimodal_locality_acc`` (top-1 agreement at the answer positions of the T-Loc / M-Loc query),
and EasyEdit main's (``MultimodalEditor``), ``locality_easyedit`` (top-1 agreement at every position
of the T-Loc row: prompt, template and answer) / ``multimodal_locality_easyedit`` (top-10 ids
compared rank by rank at every position of the M-Loc row, picture tokens included); each is averaged
per case, then over cases, as EasyEdit's per-case ``post`` values are. Sequential mode scores every
case after the last edit of its sequence; EasyEdit's ``edit(sequential_edit=True)`` scores each case
right after its own edit, and the rows also carry that protocol as ``rewrite_acc_at_edit``,
``rephrase_acc_at_edit``, ``image_rephrase_acc_at_edit``, ``locality_easyedit_at_edit`` and
``multimodal_locality_easyedit_at_edit`` (sequential mode only; printed under the table). Where the
records carry the fact's original answer (``pred``: the world's and EasyEdit's VQA records), each
case also says whether the unedited model answers each generality probe with it, every token
(``rephrase_understood``, ``image_rephrase_understood``, ``text_only_understood``,
``image_only_understood``), and the rows (and curve points) carry generality over those cases only
(``rephrase_acc_understood`` ...) and their share (``rephrase_understood_share`` ...), printed under
the table: a rephrasing the model itself cannot read measures the model, not the editor. The cost unit
``fwdbwd_seconds`` (per case) is one forward+backward pass of the model on that case's edit request,
all weights trainable: the median of 5 timed passes after 1 untimed warm-up
(:func:`.cost.fwd_bwd_seconds`); ``fwdbwd_seconds_median`` is its median over cases and
``edit_to_fwdbwd_ratio`` is ``edit_seconds_median`` over it. Extras per method: ``*_success`` (every
target token argmax-correct), ``pre_*`` (the unedited model), ``multimodal_locality_top10`` (the
same number as ``multimodal_locality_easyedit``, its older name), ``fine_locality_same_image`` /
``_same_entity`` / ``_by_form``, ``unit_consistency``, ``rewrite_exact_match`` (greedy generation),
``decoupling_n`` / ``decoupling_n_paired_success``, ``fwdbwd_seconds_median``,
``peak_memory_delta_mb``, ``n_cases``, ``extra`` (the method template's per-edit stats: ``steps``,
``seconds``, ``converged``, ``added_bytes`` and the method's own keys), ``hparams``, ``source``,
``restore``, and with ``--per-case`` a ``cases`` list. Top level also holds ``sequential_n``,
``checkpoints``, ``seed``, ``device`` (rank 0's), ``threads``, ``processes`` (how many ranks ran
it: ``torchrun`` / ``accelerate launch``), ``hparams`` and ``notes``; a run Ctrl-C stopped early
also holds ``interrupted``: ``{"units_done": int, "units": int}`` (its rows hold only those units).

Journal (:mod:`.resume`): beside ``--json`` each rank appends to ``<json>.rank<R>.jsonl`` a header
line ``{"journal": "mke-plugins bench", "version": 1, "rank", "world_size", "fingerprint"}``, then
one line per finished unit: ``{"unit": "case", "index", "cases": {NAME: case}, "notes"}`` (single
mode) or ``{"unit": "sequence", "method", "start", "cases": [case, ...], "points": [{"T", "cases",
"seconds", "added"}, ...], "notes"}`` (sequential mode; ``points`` are the sequence's checkpoints).
A case holds the per-case keys of ``--per-case``.

Sequential mode (``--mode sequential``; :mod:`.collisions`, :mod:`.curve`). The method row is the
evaluation of every edit after the last edit of its sequence, with the keys above. Records may
name the fact each probe asks (``entity`` / ``relation`` of the edit, ``loc_fact`` /
``m_loc_fact`` of the T-Loc / M-Loc probe, ``entity`` / ``relation`` / ``derived_from`` of each
fine-locality and portability item). With them, a T-Loc or M-Loc probe whose fact (or a fact it
is derived from) an edit of its sequence changes is left out of locality (a note counts them), and a
fine-locality or portability probe whose fact another edit of the sequence changes is left out
of ``fine_locality_acc`` / ``portability_acc`` and scored as ``cross_edit_consistency`` (token
accuracy against the newest edited answer made so far; ``cross_edit_success`` all tokens right;
``cross_edit_count`` probes scored; ``cross_edit_unscored`` touched probes with no edited answer
yet); data without them runs as before, and a note says the collisions were not checked. These
four keys are ``null`` in single mode and where no probe could be checked. Each method row
also holds ``curve``: a list of
``{"T": int, "n_sequences", "n_cases", "rewrite_acc", "rewrite_success", "rephrase_acc",
"image_rephrase_acc", "text_only_acc", "image_only_acc", "locality_acc",
"multimodal_locality_acc", "locality_easyedit", "multimodal_locality_easyedit",
"fine_locality_acc", "portability_acc", "cross_edit_consistency", "cross_edit_count",
"cross_edit_unscored", "retention", "edit_seconds_last10", "edit_seconds_early", "held_bytes",
"held_edits"}``, one
per checkpoint T (``--checkpoints`` and the sequence length): every edit made so far, evaluated
on the model after T edits, pooled over the sequences that reach T; ``retention`` is the
reliability of the first ``min(100, T)`` edits, ``edit_seconds_last10`` the median seconds of the
last 10 edits, ``edit_seconds_early`` that of edits 2-11 (the baseline for "does an edit slow
down"), ``held_bytes`` the sum of the edits' ``added_bytes`` (``null`` when the method reports
none) and ``held_edits`` how many edits report it. With equal-length sequences the last point
equals the method row. What the curve does not measure: one sequence order (the records'
order), teacher-forced probes (not free generation, except ``rewrite_exact_match`` at the end),
and the bytes a method reports, not the process's memory.

Programmatic use::

    from mke_plugins.bench import BenchConfig, run_bench, methods_from
    result = run_bench(BenchConfig(methods=methods_from("FT,LoRA"), cases=20))
"""

from __future__ import annotations

from typing import Any

__all__ = ["BenchConfig", "methods_from", "run_bench"]

#: default number of cases of `mke-plugins bench` with no arguments: a few minutes on 2 CPU cores with
#: every built-in method (their acceptance runs use --cases 200)
DEFAULT_CASES = 20


def __getattr__(name: str) -> Any:  # keep `import mke_plugins.bench` free of torch
    if name in ("BenchConfig", "methods_from", "run_bench"):
        from . import runner

        return getattr(runner, name)
    raise AttributeError(name)
