"""EasyEdit's own methods as bench rows: bundled YAMLs, and an undo that leaves the model as it was.

``easyedit:WISE``, ``easyedit:GRACE`` and ``easyedit:LoRA`` run out of the box: their YAMLs for a
``--hparams`` key ship in ``easyedit_hparams/<NAME>/<key>.yaml`` beside this module (EasyEdit's
own qwen2-vl values, adapted to the model of that key); ``--easyedit-hparams NAME=PATH`` replaces
them. Values written ``"@<key>"`` (``"@world-model"``) are resolved like our own YAMLs' values.

EasyEdit's restore of these methods (``hooks/EASYEDIT-NOTES.md``, "Restore") puts the weights
back but not everything else, and fails on a sequence; each apply is therefore wrapped so that the
bench's undo (:class:`EasyEditUndo`, run by :func:`~.restore.restore_like_easyedit`) does EasyEdit's
restore and then:

- puts back what EasyEdit changes besides weights and leaves changed: every parameter's
  ``requires_grad`` (GRACE, WISE and LoRA freeze the whole model), each module's train/eval mode,
  gradient checkpointing, the input-gradient hooks and the plain attributes LoRA sets on the model
  and its config (``use_cache``, ``model_parallel``, ...);
- in a sequence, does not undo alone an edit that reused the adapter an earlier edit of the
  sequence installed (GRACE's second edit has no layer to put back and fails; WISE's would
  unwrap the adapter; LoRA's returns the bare model, which has no ``unload``): removing the
  adapter with the edit that installed it undoes them all.

The bench still checks the result bit for bit (:class:`~.restore.StateCheck`). What EasyEdit's
methods print during an edit goes to this module's logger (debug level), not to the terminal.
"""

from __future__ import annotations

import contextlib
import io
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from torch import nn

from mke_hooks import MKEError

log = logging.getLogger(__name__)

#: EasyEdit's evaluator runs one unpadded row per forward pass, and its methods rely on it
ONE_ROW_NOTE = ("easyedit rows: probes run one unpadded row per pass, as EasyEdit's evaluator does (GRACE looks "
                "its key up at a fixed token index, WISE routes on the whole batch's activations)")

#: folder of the bundled EasyEdit YAMLs: ``<NAME>/<hparams key>.yaml``
BUNDLED_DIR = Path(__file__).resolve().parent / "easyedit_hparams"


def bundled_yaml(name: str, hparams_key: str) -> Path | None:
    """The bundled YAML of ``easyedit:<name>`` for ``hparams_key``, or None."""
    path = BUNDLED_DIR / name / f"{hparams_key}.yaml"
    return path if path.is_file() else None


def bundled_names(hparams_key: str) -> list[str]:
    """EasyEdit methods with a bundled YAML for ``hparams_key``."""
    if not BUNDLED_DIR.is_dir():
        return []
    return sorted(p.name for p in BUNDLED_DIR.iterdir() if (p / f"{hparams_key}.yaml").is_file())


def yaml_for(name: str, hparams_key: str, given: dict[str, str]) -> str:
    """``--easyedit-hparams`` first, then the bundled YAML; an error saying how to get one otherwise."""
    if name in given:
        return given[name]
    path = bundled_yaml(name, hparams_key)
    if path is not None:
        return str(path)
    have = bundled_names(hparams_key)
    raise MKEError(f"easyedit:{name}: no bundled YAML for --hparams {hparams_key!r} (bundled: "
                   f"{', '.join(have) or 'none'}); pass one with --easyedit-hparams {name}=PATH")


def resolve_values(hparams: Any) -> None:
    """Replace every ``"@<key>..."`` string field of an EasyEdit hparams object by its path."""
    from mke_plugins.bundled import resolve_bundled

    for key, value in list(vars(hparams).items()):
        if isinstance(value, str) and value.startswith("@"):
            setattr(hparams, key, resolve_bundled(value, key=key))


def _public(obj: Any) -> dict[str, Any]:
    """An object's plain instance attributes (``config.use_cache``, ``model.model_parallel``), not torch's own."""
    return {k: v for k, v in vars(obj).items() if not k.startswith("_")} if obj is not None else {}


def _put_attrs(obj: Any, saved: dict[str, Any]) -> None:
    """Drop the plain attributes set since ``saved`` was taken and put changed ones back."""
    for key, value in _public(obj).items():
        if key not in saved:
            delattr(obj, key)
        elif value is not saved[key]:
            setattr(obj, key, saved[key])


def _checkpointing(model: nn.Module) -> bool:
    """Gradient checkpointing on? (transformers 5.25 renamed the property; read it without the warning)."""
    prop = "is_activation_checkpointing" if hasattr(type(model), "is_activation_checkpointing") \
        else "is_gradient_checkpointing"
    return bool(getattr(model, prop, False))


@dataclass
class SideState:
    """What an EasyEdit method may change besides weights, recorded before its edit."""

    requires_grad: dict[str, bool]
    training: dict[str, bool]
    hooks: dict[str, set[int]]  # module name -> ids of its forward, forward-pre and backward hooks
    model_attrs: dict[str, Any]
    config_attrs: dict[str, Any]
    checkpointing: bool
    input_grads_hook: bool

    @classmethod
    def record(cls, model: nn.Module) -> SideState:
        return cls(requires_grad={n: p.requires_grad for n, p in model.named_parameters(remove_duplicate=False)},
                   training={n: m.training for n, m in model.named_modules()},
                   hooks={n: set(_hook_ids(m)) for n, m in model.named_modules()},
                   model_attrs=_public(model), config_attrs=_public(getattr(model, "config", None)),
                   checkpointing=_checkpointing(model), input_grads_hook=hasattr(model, "_require_grads_hook"))

    def put_back(self, model: nn.Module) -> None:
        """Restore the recorded state on ``model`` (parameters and modules matched by name)."""
        if not self.checkpointing and _checkpointing(model):
            model.gradient_checkpointing_disable()
        for name, m in model.named_modules():  # enable_input_require_grads' hooks (LoRA adds them repeatedly)
            for hid in set(_hook_ids(m)) - self.hooks.get(name, set()):
                for table in _HOOK_TABLES:
                    getattr(m, table, {}).pop(hid, None)
        if not self.input_grads_hook and hasattr(model, "_require_grads_hook"):
            del model._require_grads_hook
        _put_attrs(getattr(model, "config", None), self.config_attrs)
        _put_attrs(model, self.model_attrs)
        for name, p in model.named_parameters(remove_duplicate=False):
            if name in self.requires_grad:
                p.requires_grad_(self.requires_grad[name])
        for name, m in model.named_modules():
            if name in self.training:
                m.training = self.training[name]


_HOOK_TABLES = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
                "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks")


def _hook_ids(module: nn.Module) -> list[int]:
    return [*module._forward_hooks, *module._forward_pre_hooks, *module._backward_hooks]


def _modules(model: nn.Module) -> dict[str, int]:
    return {n: id(m) for n, m in model.named_modules()}


@dataclass
class EasyEditUndo:
    """The ``weights_copy`` the bench keeps for one EasyEdit edit (see the module docstring)."""

    weights_copy: Any
    side: SideState
    #: the edit reused an adapter an earlier edit of the sequence installed; undone with that edit
    reused_adapter: bool

    def restore_for_bench(self, policy: str, model: nn.Module, edited_model: Any) -> nn.Module:
        """Undo the edit by EasyEdit's ``policy``, then put back the side state; the model to carry on with."""
        from .restore import restore_like_easyedit

        if self.reused_adapter:
            return model
        model = restore_like_easyedit(policy, model, edited_model, self.weights_copy)
        self.side.put_back(model)
        return model


def wrap_apply(fn: Callable[..., Any]) -> Callable[..., Any]:
    """EasyEdit's apply ``fn``, called with a list of requests, returning an :class:`EasyEditUndo`."""
    clean: set[str] = set()  # module names of the model before the first edit

    def apply(model, tok, requests, hparams, copy=False, return_orig_weights=False,
              keep_original_weight=False, **kwargs):
        if isinstance(requests, dict):
            requests = [requests]
        before = _modules(model)
        if not clean:
            clean.update(before)
        side = SideState.record(model)
        printed = io.StringIO()  # EasyEdit prints every loss; a 1,000-edit run would bury the table
        with contextlib.redirect_stdout(printed):
            edited, weights_copy = fn(model, tok, list(requests), hparams, copy=copy,
                                      return_orig_weights=return_orig_weights,
                                      keep_original_weight=keep_original_weight, **kwargs)
        if printed.getvalue():
            log.debug("%s printed:\n%s", getattr(hparams, "alg_name", "EasyEdit"), printed.getvalue())
        reused = set(before) != clean and _modules(model) == before
        return edited, EasyEditUndo(weights_copy, side, reused)

    return apply

