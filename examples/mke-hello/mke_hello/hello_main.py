"""HelloFT's apply function: fine-tune one MLP value matrix on the paired edit prompt.

A template for plugin authors: ``edit_method`` (the method template) turns the algorithm below into
EasyEdit's apply function. It checks the hyperparameters and the requests, honours ``copy`` and
``return_orig_weights``, undoes a failed edit and collects the stats; the algorithm only edits,
after saying how to undo it (``ctx.snapshot()``), and yields one ``EditStats`` per request.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch

from mke_plugins.author import EditContext, EditStats, edit_method, frozen, query_of

from .hello_hparams import HelloFTHyperParams


@edit_method(HelloFTHyperParams)
def apply_hello_to_multimodal_model(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
    """Adam on one value matrix until every target token is predicted; edits accumulate on the model."""
    model, adapter, hp = ctx.model, ctx.adapter, ctx.hparams
    weight = adapter.layers(model)[hp.layer].value.weight
    ctx.snapshot().add(weight)  # the restore policy: copy the matrix back
    with frozen(model, trainable=[weight]):
        for request in requests:
            batch = adapter.batch(model, ctx.tok, [query_of(request)])
            torch.manual_seed(hp.seed)
            opt = torch.optim.Adam([weight], lr=hp.lr)
            for step in range(hp.max_steps + 1):
                logits = adapter.forward(model, batch)
                done = bool(adapter.success(logits, batch).all())
                if done or step == hp.max_steps:
                    break
                opt.zero_grad()
                adapter.loss(model, batch, logits=logits).backward()
                opt.step()
            yield EditStats(steps=step, converged=done)
