"""EasyEdit's apply function for DECODE: glue only.

Runs :func:`~mke_plugins.methods.decode.offsets.run_decode` over the requests, with the template's
snapshot receiving the original bits of every value column it changes, so ``weights_copy`` copies
them back bit for bit. In lifelong mode (``route_threshold``) the edits are kept apart and routed
(:mod:`.routed`) and the returned model is a ``RoutedModel``. Hparams, requests, flags, undo on
failure and stats are the method template's (:mod:`mke_plugins.core.template`).
"""

from __future__ import annotations

import logging
from typing import Any

from mke_plugins.core.routing import RoutedModel
from mke_plugins.core.template import EditContext, EditStats, edit_method

from .decode_hparams import DECODEHyperParams
from .offsets import EditReport, run_decode

log = logging.getLogger(__name__)


def edit_stats(report: EditReport) -> EditStats:
    """One request's record: the stages' steps summed; converged when every stage that ran stopped early."""
    ran = [s for s in report.stages if not s.skipped]
    return EditStats(steps=sum(s.steps for s in ran), seconds=report.seconds,
                     converged=all(s.early_stopped for s in ran), added_bytes=report.added_bytes,
                     extra=report.stats())


def edited_model(ctx: EditContext) -> Any:
    """The folded model itself, or in lifelong mode (``route_threshold``) the routed view of it."""
    return RoutedModel(ctx.base) if ctx.hparams.route_threshold is not None else ctx.model


@edit_method(DECODEHyperParams, edited_model=edited_model)
def apply_decode_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> list[EditStats]:
    """Apply DECODE edits in order; ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored.

    In lifelong mode the edits train on the bare model (earlier routed edits off) and nothing is folded."""
    routed = ctx.hparams.route_threshold is not None
    result = run_decode(ctx.base if routed else ctx.model, ctx.tok, requests, ctx.hparams, adapter=ctx.adapter,
                        snapshot=ctx.snapshot(), undo=ctx.undo)
    for i, report in enumerate(result.reports):
        stages = ", ".join(f"{s.name}: " + ("skipped" if s.skipped else f"{s.steps} steps, L_tgt {s.final_l_tgt}")
                           for s in report.stages)
        log.info("DECODE request %d: |N_T|=%d |N_I|=%d jaccard=%s; %s; %.2fs", i, len(report.n_text),
                 len(report.n_image), report.jaccard, stages, report.seconds)
    return [edit_stats(r) for r in result.reports]
