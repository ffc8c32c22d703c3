"""EasyEdit's apply function for DECODE: glue only (spec §5).

Normalises the requests (a bare dict in EasyEdit's sequential mode, else a list), checks them
through the family adapter, validates the hyperparameters, optionally deep-copies the model,
runs :func:`~mke_plugins.methods.decode.offsets.run_decode` and returns ``(edited_model,
weights_copy)``. ``weights_copy`` is the core ``RestoreHandle``: iterating it (EasyEdit's default
restore path) or calling it copies the original value columns back, bit for bit; with
``return_orig_weights=False`` it is empty.
"""

from __future__ import annotations

import copy as copy_module
import logging
from typing import Any

from torch import nn

from mke_plugins.adapters import get_adapter
from mke_plugins.core.requests import normalize_requests
from mke_plugins.core.snapshot import RestoreHandle

from .decode_hparams import DECODEHyperParams
from .offsets import run_decode

log = logging.getLogger(__name__)


def apply_decode_to_multimodal_model(model: nn.Module, tok: Any, requests: Any, hparams: DECODEHyperParams,
                                     copy: bool = False, return_orig_weights: bool = False,
                                     keep_original_weight: bool = False, **kwargs: Any
                                     ) -> tuple[nn.Module, RestoreHandle]:
    """Apply DECODE edits in order; ``keep_original_weight`` and extra kwargs (``train_ds``) are ignored."""
    DECODEHyperParams.check_given(hparams)
    adapter = get_adapter(model, hparams)
    requests = normalize_requests(requests, adapter)
    if copy:
        model = copy_module.deepcopy(model)
    result = run_decode(model, tok, requests, hparams, adapter=adapter)
    for i, report in enumerate(result.reports):
        stages = ", ".join(f"{s.name}: " + ("skipped" if s.skipped else f"{s.steps} steps, L_tgt {s.final_l_tgt}")
                           for s in report.stages)
        log.info("DECODE request %d: |N_T|=%d |N_I|=%d jaccard=%s; %s; %.2fs", i, len(report.n_text),
                 len(report.n_image), report.jaccard, stages, report.seconds)
    handle = RestoreHandle([result.snapshot]) if return_orig_weights else RestoreHandle()
    stats = [r.stats() for r in result.reports]
    handle.stats = stats[0] if len(stats) == 1 else stats  # read by `mke-plugins bench` (per-case extra)
    return result.model, handle
