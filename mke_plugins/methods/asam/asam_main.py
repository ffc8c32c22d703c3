"""EasyEdit's apply function for ASAM: glue only.

Reads only ``prompt``, ``target``, ``image`` and ``file_type`` of each request (README, "When to use it": the
probe fields are evaluation-only and never touched), runs
:func:`~mke_plugins.methods.asam.loop.run_asam` on the bare base model and returns a
``GatedModel``: the patches are hooks gated by ``"asam"``, active inside the returned wrapper's
``forward`` / ``__call__`` / ``generate`` only, so the base model's own forward stays original.
The restore policy removes exactly the neuron blocks and memory-bank rows this call added; no base
tensor is ever written, so restore is bit-exact by construction. Hparams, requests, flags, undo on
failure and stats are the method template's (:mod:`mke_plugins.core.template`).
"""

from __future__ import annotations

import logging
from typing import Any, Hashable

from mke_hooks.errors import RequestError
from mke_plugins.core.template import EditContext, EditStats, edit_method, gated_by, tensor_bytes

from .asam_hparams import ASAMHyperParams
from .loop import describe, run_asam
from .patch import GATE, existing_state

log = logging.getLogger(__name__)

#: the only request fields ASAM reads at edit time
EDIT_FIELDS = ("prompt", "target", "image", "file_type")
SUPPORTED_FILE_TYPES = ("image", "single-image", "text")


def check_file_types(requests: list[dict[str, Any]]) -> None:
    """Every request's ``file_type`` is one ASAM edits (a missing one means ``image``)."""
    for i, req in enumerate(requests):
        ft = req.get("file_type", "image") or "image"
        if ft not in SUPPORTED_FILE_TYPES:
            raise RequestError(f"file_type {ft!r} is not supported by ASAM (use one of {SUPPORTED_FILE_TYPES})",
                               field="file_type", index=i)


def edit_bytes(ctx: EditContext, tag: Hashable) -> int:
    """Bytes edit ``tag`` added: its neuron blocks (with their scopes) and its memory-bank rows."""
    state = existing_state(ctx.base)
    blocks = state.patches.blocks(tag=tag)
    rows = [r for t, by_layer in state.extra_rows if t == tag for r in by_layer.values()]
    scopes = sum(b.scope.nbytes for b in blocks if b.scope is not None)
    return tensor_bytes([p for b in blocks for p in b.parameters()] + rows) + scopes


@edit_method(ASAMHyperParams, fields=EDIT_FIELDS, edited_model=gated_by(GATE))
def apply_asam_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> list[EditStats]:
    """Apply ASAM edits in order; ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored."""
    check_file_types(requests)
    result = run_asam(ctx.base, ctx.tok, requests, ctx.hparams, ctx.adapter, undo=ctx.undo)
    records = []
    for i, (tag, st) in enumerate(zip(result.tags, result.stats, strict=True)):
        log.info("ASAM request %d: %s", i, describe(st))
        extra = {k: v for k, v in st.to_dict().items() if k not in ("steps", "seconds")}
        records.append(EditStats(steps=st.steps, seconds=st.seconds, converged=st.stopped,
                                 added_bytes=edit_bytes(ctx, tag), extra=extra))
    return records
