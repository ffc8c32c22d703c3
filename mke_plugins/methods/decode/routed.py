"""DECODE's lifelong mode (``route_threshold``; README, "Sequential editing"): offsets kept apart and routed.

The paper's DECODE folds each stage's offsets into the value columns. In a long sequence the
folded offsets pile up on the same columns and every one of them acts on every input that fires
its neurons (README, "Limitations"). With ``route_threshold`` set, an edit's stages train exactly as
before (a later stage trains on top of the earlier stage's offsets, now applied by hook instead of
folded), but the finished offsets go to the model's :class:`~mke_plugins.core.routing.RoutedEdits`
with the edit's routing keys: the FFN input at ``route_layer`` of the edit's own three queries
(text, image, paired) at their answer-predicting positions, on the model before the edit (with
``route_window`` above 1, each averaged with the positions before it, as inputs are). The
edit localises and trains with the earlier edits its own queries route to in force, so it is made
on the model as that model answers this fact. The edited model is a
:class:`~mke_plugins.core.routing.RoutedModel`, which applies an edit to a whole input when that
input comes close enough to one of its keys. No weight is written.
"""

from __future__ import annotations

from typing import Any, Hashable

import torch
from torch import nn

from mke_plugins.adapters import VLMAdapter
from mke_plugins.core.deltas import DeltaSet
from mke_plugins.core.hooks import capture
from mke_plugins.core.routing import RoutedEdit, RoutedEdits

from .localize import stage_queries


def route_keys(adapter: VLMAdapter, model: nn.Module, tok: Any, request: dict[str, Any],
               store: RoutedEdits) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(keys, admitted)``. ``keys`` ``(k, d)``: unit rows, the routing point's states at the
    answer-predicting positions of the request's text, image and paired queries, on the model with no
    routed edit active. ``admitted`` ``(1, E)``: the earlier edits any of those queries routes to
    (``None`` when there are none yet): the model as it answers this fact, which the edit trains on."""
    q = stage_queries(request)
    rows, admitted = [], None
    for query in (q.text, q.image, q.paired):
        if query is None:
            continue
        batch = adapter.batch(model, tok, [query])
        with torch.no_grad(), capture({"r": store.route_point}, seq_shape=tuple(batch.labels.shape)) as rec:
            adapter.forward(model, batch)
        states = rec["r"]
        routing = store.states(states, batch.attention_mask)  # the store's window, as inputs will be routed
        rows.append(routing[batch.answer_mask.to(routing.device)])
        if store.edits:
            here = store.decide_states(routing, batch.attention_mask)
            admitted = here if admitted is None else admitted | here
    return torch.nn.functional.normalize(torch.cat(rows), dim=-1), admitted


def routed_edit(tag: Hashable, keys: torch.Tensor, threshold: float, stages: list[tuple[list[int], DeltaSet]],
                exclusive: bool = False) -> RoutedEdit:
    """The finished stages' offsets as one routed edit: per layer, the columns and ``Z`` rows of every stage
    (a neuron edited in both stages appears twice, and its two rows add up, as two folds would)."""
    by_layer: dict[int, list[tuple[torch.Tensor, torch.Tensor]]] = {}
    for layers, deltas in stages:
        for layer, d in zip(layers, deltas.deltas, strict=True):
            by_layer.setdefault(layer, []).append((d.idx, d.Z.detach().clone()))
    offsets = {layer: (torch.cat([i for i, _ in parts]), torch.cat([z for _, z in parts]))
               for layer, parts in by_layer.items()}
    return RoutedEdit(tag, keys, float(threshold), offsets, exclusive)
