"""HelloFT's apply function: fine-tune one MLP value matrix on the paired edit prompt.

Built only from the public pieces of mke-plugins, as a template for plugin authors:
``check_given`` checks the hyperparameters and ``normalize_requests`` the requests, the family
adapter builds inputs exactly as EasyEdit's evaluator does and locates the layer, ``frozen``
trains only the matrix, ``WeightSnapshot`` saves it before it changes and ``RestoreHandle`` is
the ``weights_copy`` EasyEdit's restore path understands.
"""

from __future__ import annotations

from typing import Any

import torch

from mke_plugins.adapters import get_adapter
from mke_plugins.core.modes import frozen
from mke_plugins.core.requests import normalize_requests, query_of
from mke_plugins.core.snapshot import RestoreHandle, WeightSnapshot

from .hello_hparams import HelloFTHyperParams


def apply_hello_to_multimodal_model(model, tok, requests, hparams, copy=False,
                                    return_orig_weights=False, keep_original_weight=False,
                                    **kwargs: Any):
    """EasyEdit's multimodal apply signature; edits accumulate on ``model``."""
    HelloFTHyperParams.check_given(hparams)  # the right class, with valid values (EasyEdit passes any object)
    adapter = get_adapter(model, hparams)
    requests = normalize_requests(requests, adapter)
    layers = adapter.layers(model)
    weight = layers[hparams.layer].value.weight
    handle = RestoreHandle()
    handle.add_snapshot(WeightSnapshot(model).add(weight))
    with frozen(model, trainable=[weight]):
        for request in requests:
            batch = adapter.batch(model, tok, [query_of(request)])
            torch.manual_seed(hparams.seed)
            opt = torch.optim.Adam([weight], lr=hparams.lr)
            for _ in range(hparams.max_steps):
                logits = adapter.forward(model, batch)
                if bool(adapter.success(logits, batch).all()):
                    break
                loss = adapter.loss(model, batch, logits=logits)
                opt.zero_grad()
                loss.backward()
                opt.step()
    return model, (handle if return_orig_weights else RestoreHandle())
