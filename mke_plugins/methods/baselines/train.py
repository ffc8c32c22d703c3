"""The optimisation loop both baselines share: Adam on a few tensors until the edit succeeds.

Loss and success come from the family adapter (cross-entropy on the target tokens in fp32;
success = every target token is the argmax), on inputs the adapter builds exactly as EasyEdit's
evaluator does. The optimiser keeps fp32 master copies (float64 for a float64 weight: never
narrower than the weight), each beside its weight, so bf16/fp16 weights are updated honestly (the
weight gets the rounded master after each step). Only the trained tensors'
``requires_grad`` is on during the fit (every other parameter is frozen, so no pass records a graph
through the vision tower and the encoder cache can stand in for it); every flag is put back
afterwards. The loss reads only the answer positions (``adapter.answer_logits``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Sequence

import torch

from mke_plugins.adapters.base import unwrap_model
from mke_plugins.adapters.placement import work_dtype
from mke_plugins.core.finite import check_finite
from mke_plugins.core.modes import frozen

FIX = "lower `lr`, or load the model in float32."


@dataclass
class FitResult:
    steps: int  # optimiser steps taken
    success: bool  # every target token is the argmax after the last step
    loss: float  # target cross-entropy after the last step
    first_loss: float  # target cross-entropy before any step


def master_copies(params: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The optimiser's copies of ``params``: on each one's device, float32 or its own dtype when wider."""
    return [p.detach().to(work_dtype(p.dtype), copy=True) for p in params]


def fit(adapter: Any, model: Any, batch: Any, params: Sequence[torch.Tensor], *, lr: float, max_steps: int,
        weight_decay: float = 0.0,
        project: Callable[[list[torch.Tensor]], None] | None = None, method: str = "FT") -> FitResult:
    """Adam on ``params`` to fit ``batch``'s targets; stop when all target tokens are argmax-correct.

    ``project`` may modify the fp32 masters in place after every step (e.g. a norm constraint).
    A non-finite loss raises ``NonFiniteLossError`` naming ``method`` and the step.
    """
    params = list(params)
    masters = master_copies(params)
    opt = torch.optim.Adam(masters, lr=lr, weight_decay=weight_decay)
    steps, first = 0, None
    with frozen(unwrap_model(model), params, eval_mode=False):
        while True:
            with torch.enable_grad():
                answers = adapter.answer_logits(model, batch)
                loss = answers.loss()
            check_finite(method, steps + 1, nll=loss, fix=FIX)
            if first is None:
                first = float(loss.detach())
            ok = bool(answers.success().all())
            if ok or steps >= max_steps:
                return FitResult(steps, ok, float(loss.detach()), first)
            grads = torch.autograd.grad(loss, params)
            del answers, loss
            for m, g in zip(masters, grads, strict=True):
                m.grad = g.detach().to(m.dtype)
            opt.step()
            opt.zero_grad(set_to_none=True)
            if project is not None:
                project(masters)
            with torch.no_grad():
                for p, m in zip(params, masters, strict=True):
                    p.copy_(m.to(p.dtype))
            steps += 1
