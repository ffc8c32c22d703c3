"""EasyEdit's apply function for the LoRA baseline: peft adapters added, trained, removed on restore.

The chosen modules (by name suffix, inside the chosen decoder layers found through the family
adapter) are replaced in their parent by peft's ``lora.Linear`` wrapping the original module;
the adapter is trained with :func:`..train.fit` until the edit succeeds. Restore puts the
original module objects back (what peft's ``unload()`` does), so the module tree, the weights
and the ``requires_grad`` flags are exactly those of before: nothing of the base weights was
touched.

Sequential edits (EasyEdit's sequential mode, the bench's ``--mode sequential``) find the
adapters already there and keep training them; that edit's ``weights_copy`` snapshots the
adapter weights first, so restoring the edits in reverse order walks back through every state
and the first edit's restore removes the adapters.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch import nn

from mke_hooks import HparamsError
from mke_plugins.adapters.base import unwrap_model
from mke_plugins.core.requests import query_of
from mke_plugins.core.template import EditContext, EditStats, edit_method, tensor_bytes

from ..ft.ft_main import resolve_layer
from ..train import fit
from .lora_hparams import LoRAHyperParams

ADAPTER_NAME = "mke_lora"


def _matches(rel_name: str, suffix: str) -> bool:
    return rel_name == suffix or rel_name.endswith("." + suffix)


def find_targets(adapter: Any, model: nn.Module,
                 hparams: LoRAHyperParams) -> list[tuple[nn.Module, str, str, nn.Module]]:
    """``(parent, attribute, full name, module)`` for every target module, in layer order."""
    base = unwrap_model(model)
    names = {id(m): n for n, m in base.named_modules()}
    infos = {}
    for idx in hparams.layers:
        info = resolve_layer(adapter, base, idx, key="layers")
        infos[info.index] = info
    out = []
    for index in sorted(infos):
        layer = infos[index].layer
        layer_name = names[id(layer)]
        for suffix in hparams.target_modules:
            found = [(rel, m) for rel, m in layer.named_modules() if rel and _matches(rel, suffix)]
            if not found:
                have = sorted({rel.rsplit(".", 1)[-1] for rel, m in layer.named_modules() if isinstance(m, nn.Linear)})
                raise HparamsError(f"no module ending in {suffix!r} in decoder layer {index} ({layer_name}).",
                                   key="target_modules", fix=f"use suffixes of its linear layers: {have}.")
            for rel, m in found:
                parent_name, _, attr = rel.rpartition(".")
                parent = layer.get_submodule(parent_name) if parent_name else layer
                out.append((parent, attr, f"{layer_name}.{rel}", m))
    return out


def _wrap(module: nn.Linear, hparams: LoRAHyperParams, seed: int) -> nn.Module:
    from peft import LoraConfig
    from peft.tuners.lora.layer import Linear as LoraLinear

    config = LoraConfig(r=hparams.rank, lora_alpha=hparams.lora_alpha, lora_dropout=hparams.lora_dropout,
                        target_modules=list(hparams.target_modules))
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        wrapped = LoraLinear(module, ADAPTER_NAME, config=config, r=hparams.rank, lora_alpha=hparams.lora_alpha,
                             lora_dropout=hparams.lora_dropout)
    return wrapped


def _adapter_params(module: nn.Module) -> list[torch.Tensor]:
    return [module.lora_A[ADAPTER_NAME].weight, module.lora_B[ADAPTER_NAME].weight]


def attach(ctx: EditContext) -> tuple[list[torch.Tensor], int, int]:
    """Add adapters where missing (undo: put the originals back), snapshot existing ones.

    Returns the adapter weights to train, how many adapters are new and the bytes they add.
    """
    from peft.tuners.lora.layer import LoraLayer

    params: list[torch.Tensor] = []
    snapshot = ctx.snapshot()
    new, added = 0, 0
    for k, (parent, attr, full, module) in enumerate(find_targets(ctx.adapter, ctx.model, ctx.hparams)):
        if isinstance(module, LoraLayer):
            if ADAPTER_NAME not in module.lora_A:
                raise HparamsError(f"{full} already carries a LoRA adapter that is not this baseline's.",
                                   key="target_modules", fix="edit a model without other peft adapters.")
            for p in _adapter_params(module):
                snapshot.add(p)
            params += _adapter_params(module)
            continue
        if type(module) is not nn.Linear:
            raise HparamsError(f"{full} is a {type(module).__name__}, not an nn.Linear.", key="target_modules",
                               fix="target linear projections such as q_proj, v_proj or down_proj.")
        ctx.undo(lambda parent=parent, attr=attr, module=module: setattr(parent, attr, module))
        wrapped = _wrap(module, ctx.hparams, ctx.hparams.seed + k)
        setattr(parent, attr, wrapped)
        params += _adapter_params(wrapped)
        added += tensor_bytes(_adapter_params(wrapped))
        new += 1
    return params, new, added


@edit_method(LoRAHyperParams)
def apply_lora_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
    """Train LoRA adapters on each request's paired query; ``train_ds`` and other kwargs are ignored.

    The adapters' bytes count toward the first request's ``added_bytes``.
    """
    hp, adapter, model = ctx.hparams, ctx.adapter, ctx.model
    params, new, added = attach(ctx)
    for req in requests:
        batch = adapter.batch(model, ctx.tok, [query_of(req)], append_eos=hp.append_eos)
        res = fit(adapter, model, batch, params, lr=hp.lr, max_steps=hp.max_steps,
                  weight_decay=hp.weight_decay, method="LoRA")
        yield EditStats(steps=res.steps, converged=res.success, added_bytes=added,
                        extra={"loss_before": res.first_loss, "loss_after": res.loss,
                               "adapters": len(params) // 2, "new_adapters": new})
        added = 0
