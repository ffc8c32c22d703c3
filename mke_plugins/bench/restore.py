"""Undo an edit the way EasyEdit main does, then prove the model is bit-identical again.

EasyEdit's ``restore_after_edit`` (``hooks/EASYEDIT-NOTES.md``, "Restore") decides by the method's
name: call ``weights_copy`` (``CALLABLE_RESTORE_ALGS``), ``edited_model.unload()``
(``PEFT_RESTORE_ALGS``), keep the edited model (``KEEP_EDITED_MODEL_ALGS``), or, by default, copy
every ``weights_copy.items()`` tensor back into the parameter of that name. Our methods declare
the same choice as ``MethodSpec.restore``; EasyEdit's own methods get it from EasyEdit's sets.

:class:`StateCheck` records every parameter and buffer (values, dtype, device,
``requires_grad``), the module tree, the number of hooks and the train/eval mode once, and
compares the model against it after each restore without cloning it again.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from mke_hooks import MKEError


class RestoreError(MKEError):
    """An edit was not undone bit-exactly."""


def restore_like_easyedit(policy: str, model: nn.Module, edited_model: Any, weights_copy: Any) -> nn.Module:
    """Undo one edit by EasyEdit main's rules for ``policy``; return the model to carry on with.

    A ``weights_copy`` with a ``restore_for_bench`` method (the bench's wrapper of an EasyEdit
    method's edit, :class:`~.easyedit_rows.EasyEditUndo`) undoes itself.
    """
    if hasattr(type(weights_copy), "restore_for_bench"):
        return weights_copy.restore_for_bench(policy, model, edited_model)
    if policy == "callable":
        weights_copy()
        return model
    if policy == "peft":
        restored = edited_model.unload()
        if hasattr(restored, "peft_config"):  # as EasyEdit main does: or its LoRA reuses the bare model
            del restored.peft_config
        return restored
    if policy == "keep":
        return edited_model
    if weights_copy is None:
        return model
    with torch.no_grad():
        for name, value in weights_copy.items():
            param = model.get_parameter(name)
            param.copy_(value.to(device=param.device, dtype=param.dtype))
    return model


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               for m in model.modules())


class StateCheck:
    """A bit-exact record of a model's state, to compare the model against after restores."""

    def __init__(self, model: nn.Module) -> None:
        self.params = {n: (p.detach().clone(), p.requires_grad)
                       for n, p in model.named_parameters(remove_duplicate=False)}
        self.buffers = {n: b.detach().clone() for n, b in model.named_buffers(remove_duplicate=False)
                        if b is not None}
        self.modules = [n for n, _ in model.named_modules()]
        self.hooks = _hooks(model)
        self.training = model.training

    def differences(self, model: nn.Module, limit: int = 10) -> list[str]:
        """What differs between ``model`` and the record (empty when bit-identical)."""
        diffs: list[str] = []
        modules = [n for n, _ in model.named_modules()]
        if modules != self.modules:
            added = sorted(set(modules) - set(self.modules))[:3]
            removed = sorted(set(self.modules) - set(modules))[:3]
            diffs.append(f"module tree changed (added {added}, removed {removed})")
        params = dict(model.named_parameters(remove_duplicate=False))
        if list(params) != list(self.params):
            diffs.append(f"parameter names changed: {sorted(set(params) ^ set(self.params))[:5]}")
        for name, (saved, flag) in self.params.items():
            p = params.get(name)
            if p is None:
                continue
            if p.dtype != saved.dtype or p.device != saved.device:
                diffs.append(f"{name}: dtype/device {saved.dtype}/{saved.device} -> {p.dtype}/{p.device}")
            elif p.requires_grad != flag:
                diffs.append(f"{name}: requires_grad {flag} -> {p.requires_grad}")
            elif p.shape != saved.shape or not torch.equal(p.detach(), saved):
                gap = (p.detach().float() - saved.float()).abs().max().item() if p.shape == saved.shape else "shape"
                diffs.append(f"{name}: values differ (max abs diff {gap})")
            if len(diffs) >= limit:
                return diffs
        buffers = {n: b for n, b in model.named_buffers(remove_duplicate=False) if b is not None}
        for name, saved in self.buffers.items():
            b = buffers.get(name)
            if b is None or b.shape != saved.shape or not torch.equal(b, saved):
                diffs.append(f"buffer {name}: missing or values differ")
        hooks = _hooks(model)
        if hooks != self.hooks:
            diffs.append(f"{hooks - self.hooks:+d} hooks left on the model")
        if model.training != self.training:
            diffs.append(f"train/eval mode changed to training={model.training}")
        return diffs[:limit]

    def verify(self, model: nn.Module, method: str, when: str) -> None:
        """Raise :class:`RestoreError` naming ``method`` unless ``model`` matches the record."""
        diffs = self.differences(model)
        if diffs:
            raise RestoreError(
                f"method {method!r}: restore {when} is not bit-exact: " + "; ".join(diffs)
                + ". The method's weights_copy must undo every change (see hooks/EASYEDIT-NOTES.md, "
                  "'Restore'); run with "
                  "--no-verify-restore only to look at its metrics anyway.")
