"""EasyEdit's apply function for LDKE: glue only (spec §4 "Apply").

Normalises the requests (a bare dict in EasyEdit's sequential mode, else a list), checks them
through the family adapter, validates the hyperparameters, finds or creates the model's LDKE
state (archive loaded once and cached), runs :func:`~mke_plugins.methods.ldke.edit.edit_one` per
request and returns ``(RoutedModel, RestoreHandle)``. The handle removes exactly the entries this
call added (and the hooks and state once no entry is left), so restore is bit-exact by
construction: no base parameter or buffer is ever written. Per-edit statistics sit on
``handle.stats`` for the bench. Only ``prompt``, ``target``, ``image`` and ``file_type`` of a
request are read.
"""

from __future__ import annotations

import copy as copy_module
import logging
from typing import Any

from torch import nn

from mke_plugins.adapters import get_adapter, unwrap_model
from mke_plugins.core.requests import normalize_requests
from mke_plugins.core.snapshot import RestoreHandle

from .edit import edit_one, state_for
from .ldke_hparams import LDKEHyperParams
from .routed import RoutedModel

log = logging.getLogger(__name__)
EDIT_FIELDS = ("prompt", "target", "image", "file_type")


def _edit_view(request: dict[str, Any]) -> dict[str, Any]:
    """The request fields LDKE may read at edit time (the probe fields are evaluation-only)."""
    return {k: request[k] for k in EDIT_FIELDS if k in request}


def apply_ldke_to_multimodal_model(model: nn.Module, tok: Any, requests: Any, hparams: LDKEHyperParams,
                                   copy: bool = False, return_orig_weights: bool = False,
                                   keep_original_weight: bool = False, **kwargs: Any
                                   ) -> tuple[RoutedModel, RestoreHandle]:
    """Apply LDKE edits in order; ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored."""
    LDKEHyperParams.check_given(hparams)
    adapter = get_adapter(model, hparams)
    if isinstance(requests, dict):
        requests = [requests]
    if isinstance(requests, (list, tuple)):
        requests = [_edit_view(r) if isinstance(r, dict) else r for r in requests]
    requests = normalize_requests(requests, adapter)
    base = unwrap_model(model)
    if copy:
        base = copy_module.deepcopy(base)
    state = state_for(base, tok, hparams, adapter)
    hooked = list(state.side.handles)
    added: list[int] = []
    reports = []
    try:
        for i, request in enumerate(requests):
            report = edit_one(state, request, hparams, index=i)
            added.append(report.entry)
            reports.append(report)
            log.info("LDKE request %d: layers %s (%s, %.3fs), %d steps, NLL %.4f, supersedes %s", i, report.layers,
                     report.localization.method, report.seconds.get("localize", 0.0), report.steps,
                     report.final_nll, report.superseded)
    except BaseException:
        state.remove(added)
        state.side.keep_only(hooked)
        raise
    handle = RestoreHandle(undo=[lambda: state.remove(added)]) if return_orig_weights else RestoreHandle()
    handle.stats = reports[0].stats() if len(reports) == 1 else [r.stats() for r in reports]
    return RoutedModel(base, state), handle
