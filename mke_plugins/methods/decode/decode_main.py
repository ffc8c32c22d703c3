"""EasyEdit's apply function for DECODE: glue only.

Runs :func:`~mke_plugins.methods.decode.offsets.run_decode` over the requests, with the template's
snapshot receiving the original bits of every value column it changes, so ``weights_copy`` copies
them back bit for bit. Hparams, requests, flags, undo on failure and stats are the method
template's (:mod:`mke_plugins.core.template`).
"""

from __future__ import annotations

import logging
from typing import Any

from mke_plugins.core.template import EditContext, EditStats, edit_method

from .decode_hparams import DECODEHyperParams
from .offsets import EditReport, run_decode

log = logging.getLogger(__name__)


def edit_stats(report: EditReport) -> EditStats:
    """One request's record: the stages' steps summed; converged when every stage that ran stopped early."""
    ran = [s for s in report.stages if not s.skipped]
    return EditStats(steps=sum(s.steps for s in ran), seconds=report.seconds,
                     converged=all(s.early_stopped for s in ran), extra=report.stats())


@edit_method(DECODEHyperParams)
def apply_decode_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> list[EditStats]:
    """Apply DECODE edits in order; ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored."""
    result = run_decode(ctx.model, ctx.tok, requests, ctx.hparams, adapter=ctx.adapter, snapshot=ctx.snapshot())
    for i, report in enumerate(result.reports):
        stages = ", ".join(f"{s.name}: " + ("skipped" if s.skipped else f"{s.steps} steps, L_tgt {s.final_l_tgt}")
                           for s in report.stages)
        log.info("DECODE request %d: |N_T|=%d |N_I|=%d jaccard=%s; %s; %.2fs", i, len(report.n_text),
                 len(report.n_image), report.jaccard, stages, report.seconds)
    return [edit_stats(r) for r in result.reports]
