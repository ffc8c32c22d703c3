"""Bit-exact model state snapshots for tests and the conformance kit."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def model_state(model: nn.Module) -> dict[str, Any]:
    """Clones of every parameter and buffer with name, dtype, device and ``requires_grad``."""
    params = {n: (p.detach().clone(), p.requires_grad) for n, p in model.named_parameters()}
    buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    return {"params": params, "buffers": buffers, "training": model.training,
            "modules": [n for n, _ in model.named_modules()]}


def assert_same_state(before: dict[str, Any], after: dict[str, Any]) -> None:
    """Raise AssertionError naming the first tensor that is not bit-identical."""
    assert list(before["params"]) == list(after["params"]), \
        f"parameter names changed: {sorted(set(before['params']) ^ set(after['params']))[:5]}"
    assert list(before["buffers"]) == list(after["buffers"]), "buffer names changed"
    assert before["modules"] == after["modules"], "modules were added or removed"
    for name, (t0, rg0) in before["params"].items():
        t1, rg1 = after["params"][name]
        assert t0.dtype == t1.dtype and t0.device == t1.device, f"{name}: dtype/device changed"
        assert rg0 == rg1, f"{name}: requires_grad changed"
        assert torch.equal(t0, t1), f"{name}: values changed"
    for name, b0 in before["buffers"].items():
        assert torch.equal(b0, after["buffers"][name]), f"buffer {name}: values changed"
    assert before["training"] == after["training"], "train/eval mode changed"


def hook_count(model: nn.Module) -> int:
    """Forward hooks and pre-hooks on every module of ``model``."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())
