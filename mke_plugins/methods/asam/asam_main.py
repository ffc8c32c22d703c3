"""EasyEdit's apply function for ASAM: glue only (spec §4 "Apply").

Reads only ``prompt``, ``target``, ``image`` and ``file_type`` of each request (spec §1: the
probe fields are evaluation-only and never touched), checks them through the family adapter,
runs :func:`~mke_plugins.methods.asam.loop.run_asam` on the bare base model and returns
``(GatedModel, RestoreHandle)``. The patches are hooks gated by ``"asam"``: active inside the
returned wrapper's ``forward`` / ``__call__`` / ``generate`` only, so the base model's own forward
stays original. ``weights_copy`` removes exactly the neuron blocks and memory-bank rows this call
added (iterating it, EasyEdit's default restore path, or calling it); no base tensor is ever
written, so restore is bit-exact by construction. Per-edit statistics are on ``weights_copy.stats``.
"""

from __future__ import annotations

import copy as copy_module
import functools
import logging
from typing import Any, Mapping

from torch import nn

from mke_hooks.errors import RequestError
from mke_plugins.adapters import get_adapter, unwrap_model
from mke_plugins.core.requests import normalize_requests
from mke_plugins.core.snapshot import RestoreHandle
from mke_plugins.core.wrap import GatedModel, gated

from .asam_hparams import ASAMHyperParams
from .loop import describe, run_asam
from .patch import GATE, undo_edit

log = logging.getLogger(__name__)

#: the only request fields ASAM reads at edit time
EDIT_FIELDS = ("prompt", "target", "image", "file_type")
SUPPORTED_FILE_TYPES = ("image", "single-image", "text")


def edit_inputs(requests: Any) -> list[dict[str, Any]]:
    """Minimal request dicts holding only ``EDIT_FIELDS`` (missing ones stay missing for the checks)."""
    if isinstance(requests, Mapping):
        requests = [requests]
    if not isinstance(requests, (list, tuple)):
        raise RequestError(f"requests must be a dict or a list of dicts, got {type(requests).__name__}")
    out = []
    for i, req in enumerate(requests):
        if not isinstance(req, Mapping):
            raise RequestError(f"must be a dict, got {type(req).__name__}", index=i)
        slim = {k: req[k] for k in EDIT_FIELDS if k in req}
        ft = slim.get("file_type", "image") or "image"
        if ft not in SUPPORTED_FILE_TYPES:
            raise RequestError(f"file_type {ft!r} is not supported by ASAM (use one of {SUPPORTED_FILE_TYPES})",
                               field="file_type", index=i)
        out.append(slim)
    return out


def apply_asam_to_multimodal_model(model: nn.Module, tok: Any, requests: Any, hparams: ASAMHyperParams,
                                   copy: bool = False, return_orig_weights: bool = False,
                                   keep_original_weight: bool = False, **kwargs: Any
                                   ) -> tuple[GatedModel, RestoreHandle]:
    """Apply ASAM edits in order. ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored;
    the returned handle always undoes this call's edits (nothing else is touched)."""
    ASAMHyperParams.check_given(hparams)
    base = unwrap_model(model)
    adapter = get_adapter(base, hparams)
    reqs = normalize_requests(edit_inputs(requests), adapter)
    if copy:
        base = copy_module.deepcopy(base)
        model = base
    result = run_asam(base, tok, reqs, hparams, adapter)
    for i, st in enumerate(result.stats):
        log.info("ASAM request %d: %s", i, describe(st))
    handle = RestoreHandle(undo=[functools.partial(undo_edit, base, tag) for tag in result.tags])
    stats = [s.to_dict() for s in result.stats]
    handle.stats = stats[0] if len(stats) == 1 else stats  # type: ignore[attr-defined]
    edited = gated(model if isinstance(model, GatedModel) else base, GATE)
    return edited, handle
