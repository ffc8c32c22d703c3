"""EasyEdit's apply function for the FT baseline: glue around :func:`..train.fit`.

Per request, in order: build the paired query's teacher-forced batch through the family adapter
and run Adam on one layer's value matrix until every target token is the argmax (or
``max_steps``). The matrix is snapshotted once, before the first change, so ``weights_copy``
copies it back bit for bit. Hparams, requests, flags, undo on failure and stats are the method
template's (:mod:`mke_plugins.core.template`).
"""

from __future__ import annotations

from typing import Any, Iterator

from torch import nn

from mke_hooks import HparamsError
from mke_plugins.core.requests import query_of
from mke_plugins.core.template import EditContext, EditStats, edit_method

from ..train import fit, master_copies
from .ft_hparams import FTHyperParams


def resolve_layer(adapter: Any, model: nn.Module, index: int, key: str = "layer"):
    """The adapter's ``LayerInfo`` for ``index`` (negative counts from the end), or a clear error."""
    layers = adapter.layers(model)
    if not -len(layers) <= index < len(layers):
        raise HparamsError(f"{key} {index} is out of range: the model has {len(layers)} decoder layers.",
                           key=key, fix=f"use 0..{len(layers) - 1} or a negative index from the end.")
    return layers[index]


@edit_method(FTHyperParams)
def apply_ft_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
    """Fine-tune one value matrix on each request's paired query; ``train_ds`` and other kwargs are ignored."""
    hp, adapter, model = ctx.hparams, ctx.adapter, ctx.model
    info = resolve_layer(adapter, model, hp.layer)
    weight = info.value.weight
    ctx.snapshot().add(weight)
    original = master_copies([weight])[0] if hp.norm_constraint > 0 else None

    def project(masters):
        eps = hp.norm_constraint
        masters[0].copy_(masters[0].clamp(original - eps, original + eps))

    for req in requests:
        batch = adapter.batch(model, ctx.tok, [query_of(req)], append_eos=hp.append_eos)
        res = fit(adapter, model, batch, [weight], lr=hp.lr, max_steps=hp.max_steps,
                  weight_decay=hp.weight_decay, project=project if original is not None else None)
        yield EditStats(steps=res.steps, converged=res.success,
                        extra={"loss_before": res.first_loss, "loss_after": res.loss, "layer": info.index,
                               "param": f"{info.value_name}.weight"})
