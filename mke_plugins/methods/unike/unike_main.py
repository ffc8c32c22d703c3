"""EasyEdit's apply function for UniKE: glue only (README, "Edit, per request", steps 1 and 7).

Loads and checks the offline archive (cached per path and model), runs :func:`~.edit.edit_one`
once per request in order, and returns a ``GatedModel`` over the base model: calling it switches
UniKE's hooks on, so the bare model keeps its original behaviour (honest "pre" metrics). The
restore policy removes each edit's neuron blocks and memory entries; when no UniKE edit remains
it also removes every hook and the registry entry. No model parameter or buffer is ever written.
Hparams, requests, flags, undo on failure and stats are the method template's
(:mod:`mke_plugins.core.template`).
"""

from __future__ import annotations

import functools
import logging
from typing import Any, Iterator

import torch
from torch import nn

from mke_plugins.adapters import resolve_layers
from mke_plugins.core.modes import frozen
from mke_plugins.core.template import EditContext, EditStats, edit_method, gated_by, tensor_bytes

from .archive import Archive, load_archive, record_hash
from .edit import EditReport, edit_one
from .runtime import GATE, UniKERuntime, runtime_for
from .unike_hparams import UniKEHyperParams

log = logging.getLogger(__name__)


def check_records(archive: Archive, requests: list[dict[str, Any]]) -> None:
    """Warn about requests the archive was built from: their results measure training data."""
    for i, r in enumerate(requests):
        if archive.record_hashes and record_hash(r["prompt"], r["target"]) in archive.record_hashes:
            log.warning("UniKE request #%d (%r -> %r) was used to build the archive %s: its results measure "
                        "training data, not an edit", i, r["prompt"], r["target"], archive.path)


def side_bytes(rt: UniKERuntime) -> int:
    """Bytes of every UniKE neuron block and memory entry on the model."""
    blocks = [p for bs in rt.blocks.values() for b in bs for p in b.parameters()]
    rows = [v for m in rt.memories.values() for v, _ in m.entries.values()]
    scopes = sum(b.scope.nbytes for bs in rt.blocks.values() for b in bs if b.scope is not None)
    scopes += sum(sc.nbytes for m in rt.memories.values() for _, sc in m.scopes.values())
    return tensor_bytes(blocks + rows) + scopes


def edit_stats(rep: EditReport, added_bytes: int) -> EditStats:
    extra = {"edit_id": rep.edit_id, "first_loss": rep.first_loss, "final_loss": rep.final_loss,
             "retrieved": rep.retrieved, **rep.extra}
    return EditStats(steps=rep.steps, seconds=rep.seconds, converged=rep.converged, added_bytes=added_bytes,
                     extra=extra)


@edit_method(UniKEHyperParams, edited_model=gated_by(GATE))
def apply_unike_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
    """Apply UniKE edits in order; ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored."""
    base, hparams, adapter = ctx.base, ctx.hparams, ctx.adapter
    layers = resolve_layers(hparams.layers, len(adapter.layers(base)))
    archive = load_archive(hparams.archive, base, adapter, layers)
    check_records(archive, requests)
    rt = runtime_for(base, adapter)
    with frozen(base, eval_mode=False):  # the base is never trained: no gradient reaches its weights
        torch.manual_seed(int(hparams.seed))
        for r in requests:
            ctx.undo(functools.partial(_remove, base, rt.next_id))  # edit_one's id, a half-made edit's too
            before = side_bytes(rt)
            rep = edit_one(base, ctx.tok, r, hparams, adapter, archive, rt, layers)
            log.info("UniKE edit %d: %d steps, loss %s -> %s, %d retrieved, %.2fs", rep.edit_id, rep.steps,
                     rep.first_loss, rep.final_loss, rep.retrieved, rep.seconds)
            yield edit_stats(rep, side_bytes(rt) - before)


def _remove(base: nn.Module, eid: int) -> None:
    rt = runtime_for(base, create=False)
    if rt is not None:
        rt.remove_edit(eid)
