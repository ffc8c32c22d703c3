"""The edit guard: an apply that fails leaves the model exactly as it found it.

A user's model in memory is their data. Whatever stops an edit half-way (an exception, a NaN
check, Ctrl-C), :class:`EditGuard` puts back everything the failed apply may have changed:

* **weights** — from the :class:`~mke_plugins.core.snapshot.WeightSnapshot`\\ s the method took
  of what it changes (every snapshot created while a guard is active registers with it), never
  from a copy of the whole model: at 7B a copy would double the memory;
* **the module tree** — each module's ``_modules``, ``_parameters`` and ``_buffers`` entries and
  its plain attributes, so added side modules, swapped-in wrappers and attributes set on a module
  disappear;
* **hooks** — every forward/backward/state-dict hook dictionary of every module, and the global
  module hooks;
* **gates** (:mod:`mke_plugins.core.wrap`) — the model's open and always-on gates;
* **flags** — each parameter's ``requires_grad`` and each module's ``training``;
* **gradients** — each parameter's ``.grad`` (``None`` stays ``None``; an existing gradient is
  copied back, since backward accumulates into it in place).

Values a method keeps *outside* the model (a side table of its own edits) are the method's to
undo; the conformance kit's ``interrupted_edit`` check runs an edit after an injected fault and
compares it with an edit on a model that never saw one, so leftover state of that kind is caught.

On success nothing is undone; snapshots registered with a nested guard pass to the outer one.
"""

from __future__ import annotations

import contextvars
import copy
from typing import Any

import torch
import torch.nn.modules.module as _tm
from torch import nn

from mke_plugins.adapters.base import unwrap_model

from . import wrap
from .snapshot import WeightSnapshot

__all__ = ["EditGuard", "active_guard"]

#: Module attributes that hold containers mutated in place (copied, then restored key by key).
_CONTAINERS = (
    "_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
    "_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
    "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_backward_hooks", "_backward_pre_hooks",
    "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
    "_load_state_dict_post_hooks",
)
_GLOBAL_HOOKS = (
    "_global_forward_hooks", "_global_forward_hooks_always_called", "_global_forward_pre_hooks",
    "_global_backward_hooks", "_global_backward_pre_hooks", "_global_module_registration_hooks",
    "_global_parameter_registration_hooks", "_global_buffer_registration_hooks",
)

_ACTIVE: contextvars.ContextVar[tuple["EditGuard", ...]] = contextvars.ContextVar("mke_edit_guards", default=())


def active_guard() -> "EditGuard | None":
    """The innermost guard of the running apply, or None outside one."""
    stack = _ACTIVE.get()
    return stack[-1] if stack else None


def _copy(value: Any) -> Any:
    return copy.copy(value) if isinstance(value, (dict, set)) else value


def _put_back(container: Any, saved: Any) -> None:
    """Make ``container`` equal to ``saved`` in place (keys and order)."""
    if container is saved:
        return
    container.clear()
    container.update(saved)


_MISSING = object()


class _ModuleRecord:
    __slots__ = ("module", "attrs", "containers", "training")

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.attrs = {k: v for k, v in vars(module).items() if k not in _CONTAINERS}
        self.containers = {k: _copy(getattr(module, k)) for k in _CONTAINERS if hasattr(module, k)}
        self.training = module.training

    def restore(self) -> None:
        d = vars(self.module)
        for key in [k for k in d if k not in _CONTAINERS and k not in self.attrs]:
            del d[key]
        for key, value in self.attrs.items():
            if d.get(key, _MISSING) is not value:
                d[key] = value
        for key, saved in self.containers.items():
            current = d.get(key)
            if current is None:
                d[key] = saved
            else:
                _put_back(current, saved)
        self.module.training = self.training


class EditGuard:
    """Context manager that undoes a failed apply on ``model`` (see the module docstring).

    ``with EditGuard(model): fn(...)`` — on an exception (``BaseException`` included) the model is
    put back and the exception propagates unchanged; on success nothing is touched.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = unwrap_model(model)
        self.snapshots: list[WeightSnapshot] = []
        self._token: contextvars.Token | None = None

    # -- recording ----------------------------------------------------------------------
    def _record(self) -> None:
        model = self.model
        is_module = isinstance(model, nn.Module)  # anything else: only the snapshots are undone
        self._modules = [_ModuleRecord(m) for m in model.modules()] if is_module else []
        self._params = []
        for p in model.parameters() if is_module else ():
            grad = p.grad
            saved = grad.detach().clone() if grad is not None else None
            self._params.append((p, p.requires_grad, grad, saved))
        self._global = {k: _copy(getattr(_tm, k)) for k in _GLOBAL_HOOKS if hasattr(_tm, k)}
        self._gates = wrap.gate_snapshot(model) if is_module else None

    def register(self, snapshot: WeightSnapshot) -> None:
        """Called by every ``WeightSnapshot`` created while this guard is the innermost one."""
        self.snapshots.append(snapshot)

    # -- context protocol ----------------------------------------------------------------
    def __enter__(self) -> "EditGuard":
        self._record()
        self._token = _ACTIVE.set(_ACTIVE.get() + (self,))
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        _ACTIVE.reset(self._token)
        if exc_type is None:
            outer = active_guard()
            if outer is not None:
                outer.snapshots.extend(self.snapshots)
            return False
        self.rollback()
        return False

    def rollback(self) -> None:
        """Put the model back as it was on entry."""
        for rec in self._modules:
            rec.restore()
        for key, saved in self._global.items():
            _put_back(getattr(_tm, key), saved)
        if isinstance(self.model, nn.Module):
            wrap.gate_restore(self.model, self._gates)
        for snap in reversed(self.snapshots):
            snap.restore()
        with torch.no_grad():
            for p, flag, grad, saved in self._params:
                if p.requires_grad != flag:
                    p.requires_grad_(flag)
                if saved is None:
                    p.grad = None
                else:  # the same tensor object as before, with its values back
                    grad.copy_(saved)
                    p.grad = grad
