"""EasyEdit's apply function for the FT baseline: glue around :func:`..train.fit`.

Per request, in order: build the paired query's teacher-forced batch through the family adapter,
snapshot the layer's value matrix (once per apply, before the first change), run Adam on it
until every target token is the argmax (or ``max_steps``). ``weights_copy`` is the core
``RestoreHandle``: iterating it (EasyEdit's default restore path) or calling it copies the
original matrix back bit for bit. ``weights_copy.stats`` carries the steps taken and the losses.
"""

from __future__ import annotations

import copy as copy_module
from typing import Any

from torch import nn

from mke_hooks import HparamsError
from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import Query
from mke_plugins.core.requests import normalize_requests
from mke_plugins.core.snapshot import RestoreHandle, WeightSnapshot

from ..train import fit
from .ft_hparams import FTHyperParams


def resolve_layer(adapter: Any, model: nn.Module, index: int, key: str = "layer"):
    """The adapter's ``LayerInfo`` for ``index`` (negative counts from the end), or a clear error."""
    layers = adapter.layers(model)
    if not -len(layers) <= index < len(layers):
        raise HparamsError(f"{key} {index} is out of range: the model has {len(layers)} decoder layers.",
                           key=key, fix=f"use 0..{len(layers) - 1} or a negative index from the end.")
    return layers[index]


def apply_ft_to_multimodal_model(model: nn.Module, tok: Any, requests: Any, hparams: FTHyperParams,
                                 copy: bool = False, return_orig_weights: bool = False,
                                 keep_original_weight: bool = False, **kwargs: Any) -> tuple[nn.Module, RestoreHandle]:
    """Fine-tune one value matrix on each request's paired query; ``train_ds`` and other kwargs are ignored."""
    FTHyperParams.check_given(hparams)
    adapter = get_adapter(model, hparams)
    requests = normalize_requests(requests, adapter)
    if copy:
        model = copy_module.deepcopy(model)
    info = resolve_layer(adapter, model, hparams.layer)
    weight = info.value.weight
    snapshot = WeightSnapshot(model).add(weight)
    original = weight.detach().float().clone() if hparams.norm_constraint > 0 else None

    def project(masters):
        eps = hparams.norm_constraint
        masters[0].copy_(masters[0].clamp(original - eps, original + eps))

    steps, losses, ok = [], [], []
    for req in requests:
        batch = adapter.batch(model, tok, [Query(req["image"], req["prompt"], req["target"])],
                              append_eos=hparams.append_eos)
        res = fit(adapter, model, batch, [weight], lr=hparams.lr, max_steps=hparams.max_steps,
                  weight_decay=hparams.weight_decay, project=project if original is not None else None)
        steps.append(res.steps)
        losses.append((res.first_loss, res.loss))
        ok.append(res.success)
    handle = RestoreHandle([snapshot]) if return_orig_weights else RestoreHandle()
    handle.stats = {"steps": sum(steps), "converged": sum(ok) / len(ok), "loss_before": losses[0][0],
                    "loss_after": losses[-1][1], "layer": info.index, "param": f"{info.value_name}.weight"}
    return model, handle
