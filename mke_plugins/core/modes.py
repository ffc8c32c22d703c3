"""Freeze a model for the length of an edit, and put everything back exactly afterwards.

Every method optimises a few tensors of its own (offsets, neurons, side factors, one weight)
against a frozen model in eval mode. The model EasyEdit hands in must come back with the same
``requires_grad`` flags and train/eval modes it had (the conformance kit checks), so this is one
context manager rather than a try/finally in every method.
"""

from __future__ import annotations

import contextlib
from typing import Iterable, Iterator

import torch
from torch import nn


@contextlib.contextmanager
def frozen(model: nn.Module, trainable: Iterable[torch.Tensor] = (), *,
           eval_mode: bool = True) -> Iterator[None]:
    """Every parameter of ``model`` frozen except ``trainable``; eval mode unless told otherwise.

    On exit, each parameter's ``requires_grad`` and each module's ``training`` flag are restored
    to their values on entry, also when the block raises, and a parameter that had no ``.grad`` on
    entry has none on exit (the gradients of a trained weight are the method's, not the user's).
    """
    modes = [(m, m.training) for m in model.modules()]
    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    no_grad = [p for p in params if p.grad is None]
    keep = {id(t) for t in trainable}
    try:
        if eval_mode:
            model.eval()
        for p in params:
            p.requires_grad_(id(p) in keep)
        yield
    finally:
        for p, flag in zip(params, flags, strict=True):
            p.requires_grad_(flag)
        for p in no_grad:
            p.grad = None
        for m, mode in modes:
            m.training = mode
