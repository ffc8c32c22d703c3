"""What a third-party method may build on: the author surface of mke-plugins, in one import.

Everything a plugin's method needs beyond the contract package ``mke_hooks`` (whose
``hookimpl``, ``MethodSpec`` and error classes a plugin's ``__init__`` imports, so that listing
plugins imports no torch) is re-exported here, and only what is here is kept stable for plugin
authors::

    from mke_plugins.author import EditContext, EditStats, MultimodalHyperParams, edit_method, hp

``hooks/README.md`` ("Building a method") describes each name; ``examples/mke-hello`` is a
complete plugin that imports nothing else from mke-plugins (a test checks it). Importing this
module imports torch: use it from the modules your ``MethodSpec`` names by ``"module:attr"``.
"""

from __future__ import annotations

from mke_hooks import ArchiveError, HparamsError, MethodSpec, MKEError, NonFiniteLossError, RequestError, hookimpl

from .adapters import Batch, LayerInfo, Query, VLMAdapter, get_adapter, model_device, resolve_layers, unwrap_model
from .core.finite import check_finite
from .core.modes import frozen
from .core.requests import normalize_requests, query_of
from .core.snapshot import RestoreHandle, WeightSnapshot, assert_same_state, state_of
from .core.template import ApplyStats, EditContext, EditStats, edit_method, gated_by, tensor_bytes
from .core.wrap import GatedModel, gate_open, gated
from .hparams import MultimodalHyperParams, hp, load_hparams

__all__ = [
    # the contract (also importable from mke_hooks)
    "hookimpl", "MethodSpec", "MKEError", "HparamsError", "RequestError", "ArchiveError", "NonFiniteLossError",
    # hyperparameters
    "MultimodalHyperParams", "hp", "load_hparams",
    # the method template
    "edit_method", "EditContext", "EditStats", "ApplyStats", "gated_by", "tensor_bytes",
    # model families
    "get_adapter", "VLMAdapter", "Query", "Batch", "LayerInfo", "resolve_layers", "unwrap_model", "model_device",
    # requests
    "normalize_requests", "query_of",
    # changing and restoring a model
    "WeightSnapshot", "RestoreHandle", "frozen", "GatedModel", "gated", "gate_open", "check_finite",
    # checking a model came back
    "state_of", "assert_same_state",
]
