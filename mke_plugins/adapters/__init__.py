"""Model-family adapters: pick the right :class:`VLMAdapter` for a model.

``get_adapter(model, hparams)`` detects the family the way EasyEdit does: from the markers in
``hparams.model_name`` when that is a string (``vl_utils.py`` rules, plus Qwen2.5-VL names,
which EasyEdit does not recognise), otherwise (tuple mode ``model_name = (model, tok)``, no
hparams, or a path without a marker) from the model class / ``config.model_type``.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from mke_plugins.adapters.base import (
    Batch,
    HookPoint,
    LayerInfo,
    Query,
    VLMAdapter,
    model_device,
    model_dtype,
    resolve_layers,
    unwrap_model,
)
from mke_plugins.adapters.hf import LlavaOnevisionAdapter, Qwen2VLAdapter, Qwen3VLAdapter
from mke_plugins.adapters.lavis import Blip2Adapter, MiniGPT4Adapter

__all__ = ["ADAPTERS", "Batch", "HookPoint", "LayerInfo", "Query", "VLMAdapter", "detect", "get_adapter",
           "model_device", "model_dtype", "resolve_layers", "supported_families", "unwrap_model"]

#: detection order matters only for names: the LAVIS names are exact, the others substrings
ADAPTERS: tuple[type[VLMAdapter], ...] = (Blip2Adapter, MiniGPT4Adapter, Qwen3VLAdapter, Qwen2VLAdapter,
                                          LlavaOnevisionAdapter)


def supported_families() -> list[str]:
    return [a.family for a in ADAPTERS]


def detect(model: Any, hparams: Any = None) -> type[VLMAdapter]:
    """The adapter class for ``model``: by ``hparams.model_name`` markers, else by the model."""
    name = getattr(hparams, "model_name", None) if hparams is not None else None
    if isinstance(name, str):
        for cls in ADAPTERS:
            if cls.matches_name(name):
                return cls
    if isinstance(name, (tuple, list)) and name and isinstance(name[0], nn.Module) and model is None:
        model = name[0]
    if model is not None:
        for cls in ADAPTERS:
            if cls.matches_model(model):
                return cls
    base = unwrap_model(model) if model is not None else None
    what = (f"model_name {name!r}" if isinstance(name, str) else "no model_name string") + (
        f", model class {type(base).__name__} (config.model_type "
        f"{getattr(getattr(base, 'config', None), 'model_type', None)!r})" if base is not None else "")
    raise ValueError(f"cannot tell the model family from {what}. Supported families: "
                     f"{', '.join(supported_families())} (Qwen2.5-VL counts as qwen2-vl). Put the family "
                     f"marker in hparams.model_name (e.g. a directory named '...qwen2-vl...') or pass a model of "
                     f"a supported class.")


def get_adapter(model: Any, hparams: Any = None) -> VLMAdapter:
    """An adapter instance for ``model`` (see :func:`detect`)."""
    return detect(model, hparams)()
