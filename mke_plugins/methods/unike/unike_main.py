"""EasyEdit's apply function for UniKE: glue only (spec §3 step 1 and 8, §5).

Normalises the requests (a bare dict in EasyEdit's sequential mode, else a list), loads and
checks the offline archive (cached per path and model), runs :func:`~.edit.edit_one` once per
request in order, and returns ``(edited_model, weights_copy)``:

* ``edited_model`` is a ``GatedModel`` over the same base model: calling it switches UniKE's
  hooks on, so the bare model keeps its original behaviour (honest "pre" metrics);
* ``weights_copy`` is the core ``RestoreHandle`` (callable, and restoring on ``items()``): it
  removes this call's neuron blocks and memory entries; when no UniKE edit remains it also removes
  every hook and the registry entry. No model parameter or buffer is ever written.

``copy`` and ``keep_original_weight`` are accepted and have no effect (the model is never
written); ``train_ds`` and other extra keyword arguments are ignored.
"""

from __future__ import annotations

import logging
from dataclasses import asdict
from typing import Any

import torch
from torch import nn

from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import resolve_layers, unwrap_model
from mke_plugins.core.modes import frozen
from mke_plugins.core.requests import normalize_requests
from mke_plugins.core.snapshot import RestoreHandle
from mke_plugins.core.wrap import GatedModel, gated

from .archive import load_archive, record_hash
from .edit import edit_one
from .runtime import GATE, runtime_for
from .unike_hparams import UniKEHyperParams

log = logging.getLogger(__name__)


def apply_unike_to_multimodal_model(model: nn.Module, tok: Any, requests: Any, hparams: UniKEHyperParams,
                                    copy: bool = False, return_orig_weights: bool = False,
                                    keep_original_weight: bool = False, **kwargs: Any
                                    ) -> tuple[GatedModel, RestoreHandle]:
    """Apply UniKE edits in order; returns the gated edited model and the restore handle."""
    UniKEHyperParams.check_given(hparams)
    base = unwrap_model(model)
    adapter = get_adapter(base, hparams)
    requests = normalize_requests(requests, adapter)
    n_layers = len(adapter.layers(base))
    layers = resolve_layers(hparams.layers, n_layers)
    archive = load_archive(hparams.archive, base, adapter, layers)
    for i, r in enumerate(requests):
        if archive.record_hashes and record_hash(r["prompt"], r["target"]) in archive.record_hashes:
            log.warning("UniKE request #%d (%r -> %r) was used to build the archive %s: its results measure "
                        "training data, not an edit", i, r["prompt"], r["target"], archive.path)
    rt = runtime_for(base, adapter)
    handle = RestoreHandle()
    stats = []
    start = rt.next_id
    try:
        with frozen(base, eval_mode=False):  # the base is never trained: no gradient reaches its weights
            torch.manual_seed(int(hparams.seed))
            for r in requests:
                rep = edit_one(base, tok, r, hparams, adapter, archive, rt, layers)
                handle.add_undo(lambda eid=rep.edit_id: _remove(base, eid))
                stats.append(asdict(rep))
                log.info("UniKE edit %d: %d steps, loss %s -> %s, %d retrieved, %.2fs", rep.edit_id, rep.steps,
                         rep.first_loss, rep.final_loss, rep.retrieved, rep.seconds)
    except BaseException:
        for eid in [e for e in list(rt.edits) if e >= start]:
            _remove(base, eid)  # this call's edits, a half-built one included
        raise
    handle.stats = stats[0] if len(stats) == 1 else {"edits": stats}  # type: ignore[attr-defined]
    return gated(model, GATE), handle


def _remove(base: nn.Module, eid: int) -> None:
    rt = runtime_for(base, create=False)
    if rt is not None:
        rt.remove_edit(eid)
