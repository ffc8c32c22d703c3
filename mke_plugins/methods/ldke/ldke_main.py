"""EasyEdit's apply function for LDKE: glue only.

Finds or creates the model's LDKE state (archive loaded once and cached), runs
:func:`~mke_plugins.methods.ldke.edit.edit_one` per request and returns a :class:`RoutedModel`.
The restore policy removes exactly the entries this call added (and the hooks and state once no
entry is left), so restore is bit-exact by construction: no base parameter or buffer is ever
written. Only ``prompt``, ``target``, ``image`` and ``file_type`` of a request are read. Hparams,
requests, flags, undo on failure and stats are the method template's
(:mod:`mke_plugins.core.template`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator

from mke_plugins.core.template import EditContext, EditStats, edit_method, tensor_bytes

from .edit import EditReport, edit_one, state_for
from .ldke_hparams import LDKEHyperParams
from .routed import LDKEState, RoutedModel
from .side import EditEntry

log = logging.getLogger(__name__)
EDIT_FIELDS = ("prompt", "target", "image", "file_type")


def routed(ctx: EditContext) -> RoutedModel:
    """The edited model apply returns: the base model routed through its LDKE state."""
    return RoutedModel(ctx.base, LDKEState.of(ctx.base))


def edit_stats(report: EditReport, entry: EditEntry) -> EditStats:
    """One request's record; ``added_bytes`` is the entry's side factors, keys (and scope) and fingerprint."""
    extra = {k: v for k, v in report.stats().items() if k != "steps"}
    scope = entry.scope.keys if entry.scope is not None else None
    size = tensor_bytes([*entry.parameters(), entry.key_phi, entry.key_w, entry.image_mean, scope])
    return EditStats(steps=report.steps, converged=report.success, added_bytes=size, extra=extra)


@edit_method(LDKEHyperParams, fields=EDIT_FIELDS, edited_model=routed)
def apply_ldke_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
    """Apply LDKE edits in order; ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored."""
    state = state_for(ctx.base, ctx.tok, ctx.hparams, ctx.adapter)
    hooked = list(state.side.handles)
    added: list[int] = []
    ctx.undo(lambda: state.remove(added))
    ctx.on_failure(lambda: state.side.keep_only(hooked))  # hooks a failed edit installed on new layers
    ctx.on_failure(functools.partial(state.memory.rewind, state.memory.next_id))  # ids seed the augmentation
    for i, request in enumerate(requests):
        report = edit_one(state, request, ctx.hparams, index=i)
        added.append(report.entry)
        log.info("LDKE request %d: layers %s (%s, %.3fs), %d steps, NLL %.4f, supersedes %s", i, report.layers,
                 report.localization.method, report.seconds.get("localize", 0.0), report.steps,
                 report.final_nll, report.superseded)
        yield edit_stats(report, state.memory.entries[report.entry])
