"""The EasyEdit bridge: the only module that touches EasyEdit's internals.

EasyEdit has no plugin API; it dispatches through module-level dicts and sets that its editor,
trainer and restore path captured by reference at import time. ``install()`` therefore mutates
those objects *in place* (never rebinds them), adding every registered method; ``uninstall()``
removes exactly what it added. A name EasyEdit already uses is never overwritten: such a method
stays available to our bench and is reported as not injected.

Activation: call ``mke_plugins.install()`` after ``import easyeditor`` and before building a
``MultimodalEditor`` or ``MultimodalTrainer``. As a convenience, ``import mke_plugins`` does it
for you whatever the import order (``mke_plugins.autoinstall``; ``MKE_AUTO_INSTALL=0`` turns
that off).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import types
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

from mke_hooks import MKEError

from .registry import MethodEntry, Registry, get_registry

_RESTORE_SETS = {"callable": "CALLABLE_RESTORE_ALGS", "peft": "PEFT_RESTORE_ALGS",
                 "keep": "KEEP_EDITED_MODEL_ALGS"}


@dataclass
class HostModules:
    """EasyEdit's registry modules (or the stand-in host's, in CI)."""

    alg_dict: types.ModuleType
    alg_train_dict: types.ModuleType | None
    editor_utils: types.ModuleType | None
    label: str = "easyeditor"

    @property
    def is_stale_release(self) -> bool:
        """EasyEdit 0.0.1.dev0 from PyPI lacks main's sets and restore machinery."""
        return not hasattr(self.alg_dict, "MULTIMODAL_EDIT_ALGS") or self.editor_utils is None


@dataclass
class InstallReport:
    host: str
    injected: list[str] = field(default_factory=list)
    trainers: list[str] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> reason
    warnings: list[str] = field(default_factory=list)


# What we added, so uninstall() removes exactly that: (container, key or member, value).
_ADDED: list[tuple[Any, Any, Any]] = []


def easyedit_importable() -> bool:
    return importlib.util.find_spec("easyeditor") is not None


def _optional(module: str) -> types.ModuleType | None:
    try:
        return importlib.import_module(module)
    except ImportError:
        return None


def easyedit_modules() -> HostModules:
    """Import EasyEdit's registry modules (this imports the whole easyeditor package)."""
    alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    return HostModules(alg_dict, _optional("easyeditor.util.alg_train_dict"),
                       _optional("easyeditor.editors.utils"))


def _check_tokens(requests: Any, tok: Any, model: Any) -> None:
    """:func:`mke_plugins.core.requests.check_tokens`, imported on use (this module must not import torch)."""
    from .core.requests import check_tokens

    check_tokens(requests, tok, model)


def make_apply(entry: MethodEntry, attr: str = "apply_multimodal") -> Callable[..., Any]:
    """EasyEdit-facing apply: normalises ``requests``, names the method in errors, and guards the model.

    Every apply, ours or a third party's, runs inside an :class:`~mke_plugins.core.guard.EditGuard`:
    if it raises (``KeyboardInterrupt`` included), the model comes back as it was, from the
    snapshots the method took of what it changes, with its module tree, hooks, gates, flags and
    ``.grad`` restored, and the exception propagates.
    """
    spec = entry.spec

    def apply(model, tok, requests, hparams, copy=False, return_orig_weights=False,
              keep_original_weight=False, **kwargs):
        from mke_plugins.core.guard import EditGuard

        fn = spec.resolved(attr)
        if isinstance(requests, dict):
            requests = [requests]  # EasyEdit main's sequential mode passes a bare dict
        _check_tokens(requests, tok, model)  # no unknown words, no prompt over the context, before any edit
        # a template apply guards the model itself; recording the whole model twice is waste
        guard = contextlib.nullcontext() if getattr(fn, "mke_guarded", False) else EditGuard(model)
        try:
            with guard:
                return fn(model, tok, requests, hparams, copy=copy,
                          return_orig_weights=return_orig_weights,
                          keep_original_weight=keep_original_weight, **kwargs)
        except Exception as exc:
            note = f"raised by method {spec.name!r} from plugin {entry.plugin.label}"
            if hasattr(exc, "add_note"):
                exc.add_note(note)
                raise
            raise MKEError(f"{note}: {type(exc).__name__}: {exc}") from exc

    apply.__doc__ = f"Apply {spec.name} edits (EasyEdit's multimodal apply signature)."
    apply.__name__ = f"apply_{spec.name}_via_mke_plugins"
    apply.__qualname__ = apply.__name__
    apply._mke_method = spec.name  # type: ignore[attr-defined]
    return apply


def _taken(host: HostModules, name: str) -> str | None:
    """Why ``name`` cannot be injected, or None."""
    for dict_name in ("ALG_MULTIMODAL_DICT", "ALG_DICT"):
        d = getattr(host.alg_dict, dict_name, {})
        if name in d and not getattr(d[name], "_mke_method", None):
            return f"EasyEdit already has a method named {name!r} in {dict_name}"
    return None


def _put(container: dict, key: str, value: Any) -> None:
    container[key] = value
    _ADDED.append((container, key, value))


def _add_member(container: set, member: str) -> None:
    if member not in container:
        container.add(member)
        _ADDED.append((container, member, None))


def install(registry: Registry | None = None, host: HostModules | None = None) -> InstallReport:
    """Inject every registered method into EasyEdit's registries, in place. Idempotent."""
    registry = registry or get_registry()
    if host is None:
        if not easyedit_importable():
            raise MKEError("EasyEdit (easyeditor) is not importable. Put an EasyEdit main checkout "
                           "on PYTHONPATH (see README, 'Using a method from EasyEdit').")
        host = easyedit_modules()
    uninstall()
    report = InstallReport(host.label)
    if host.is_stale_release:
        msg = ("this looks like the stale PyPI easyeditor 0.0.1.dev0: it runs only blip2/minigpt4 "
               "on CUDA and lacks main's restore sets; methods are injected into "
               "ALG_MULTIMODAL_DICT only. Use EasyEdit main from source for full support.")
        report.warnings.append(msg)
        warnings.warn(msg, stacklevel=2)
    ad = host.alg_dict
    for entry in registry:
        name, spec = entry.name, entry.spec
        reason = _taken(host, name)
        if reason:
            report.skipped[name] = reason + "; ours stays available to `mke-plugins bench`"
            continue
        _put(ad.ALG_MULTIMODAL_DICT, name, make_apply(entry))
        if hasattr(ad, "MULTIMODAL_EDIT_ALGS"):
            _add_member(ad.MULTIMODAL_EDIT_ALGS, name)
        if spec.apply_text is not None and hasattr(ad, "ALG_DICT"):
            _put(ad.ALG_DICT, name, make_apply(entry, "apply_text"))
        set_name = _RESTORE_SETS.get(spec.restore)
        if set_name and host.editor_utils is not None and hasattr(host.editor_utils, set_name):
            _add_member(getattr(host.editor_utils, set_name), name)
        report.injected.append(name)
        if spec.trainer is not None and host.alg_train_dict is not None:
            key = name.upper()
            train_dict = host.alg_train_dict.ALG_TRAIN_DICT
            if key in train_dict and not getattr(train_dict[key], "_mke_method", None):
                report.skipped[f"{name} (trainer)"] = f"ALG_TRAIN_DICT already has {key!r}"
                continue
            cls = spec.resolved("trainer")
            try:
                cls._mke_method = name
            except (AttributeError, TypeError):
                pass
            _put(train_dict, key, cls)
            if hasattr(host.alg_train_dict, "MULTIMODAL_TRAIN_ALGS"):
                _add_member(host.alg_train_dict.MULTIMODAL_TRAIN_ALGS, name)
            report.trainers.append(key)
    return report


def uninstall() -> None:
    """Remove everything ``install()`` added (only entries that are still ours)."""
    while _ADDED:
        container, key, value = _ADDED.pop()
        if isinstance(container, dict):
            if container.get(key) is value:
                del container[key]
        else:
            container.discard(key)
