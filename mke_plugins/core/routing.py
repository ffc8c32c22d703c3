"""Sequence routing: an edit acts on a whole input, every position, when that input is the edit's own.

Why it exists: some edits cannot be confined position by position. DECODE's offsets sit on value
columns of the lowest layers and act at every position of the prompt; the answer reads them
through attention, so a per-position scope (:mod:`mke_plugins.core.scope`) switches them off
exactly where they are needed. In sequential (lifelong) editing such edits must still stay apart:
folded into the weights, each one acts on every input that fires its neurons, and after a few
dozen edits they pile up on the same columns (DECODE README, "Limitations").

Routing decides per input row. A first pass of the bare model (every routed edit off) reads the
routing point, the FFN input of one late decoder layer, at every non-padding position. An edit is
admitted for a row when some position there has a cosine above the edit's threshold to one of its
keys (the unit-normalised representations of the edit's own queries at their answer-predicting
positions, captured at the same point when the edit was made). With a ``window`` above 1, a
position's representation is the mean of its own and the ``window - 1`` earlier positions' unit
states, for keys and inputs alike: a rephrased question then still meets its edit where one
position alone drifted below the threshold (DECODE README, "Sequential editing"). The second pass runs the model
with each row's admitted edits only. ``generate`` routes once, on the prompt, and keeps the
decision for every decoding step (beams repeat their row's decision).

:class:`RoutedEdits` is one model's store (a side registry keyed weakly by the model, like
:mod:`mke_plugins.core.neurons`): per edit its keys and its column offsets (``Z`` rows added to
``value.weight[:, idx]``, applied by a hook on the value module as ``a[..., idx] @ Z``). No base
tensor is written, so removing the edits restores the model bit for bit. :class:`RoutedModel` is
the ``GatedModel`` a method returns as ``edited_model``; calling the bare model runs no edit.
"""

from __future__ import annotations

import contextlib
import functools
import weakref
from dataclasses import dataclass
from typing import Any, Hashable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mke_plugins.adapters.base import HookPoint, VLMAdapter, unwrap_model
from mke_plugins.core.hooks import capture
from mke_plugins.core.scope import admitted_rows, stack_keys
from mke_plugins.core.wrap import GatedModel

__all__ = ["RoutedEdit", "RoutedEdits", "RoutedModel", "routed_edits"]


@dataclass
class RoutedEdit:
    """One edit: its routing keys ``(k, d)`` (unit rows), threshold, and offsets per layer: ``{layer: (idx, Z)}``."""

    tag: Hashable
    keys: torch.Tensor
    threshold: float
    offsets: dict[int, tuple[torch.Tensor, torch.Tensor]]
    #: when every edit is exclusive, a row gets only its closest admitted edit (the largest cosine over its
    #: positions), not every edit that admits it
    exclusive: bool = False

    @property
    def nbytes(self) -> int:
        ts = [self.keys] + [t for pair in self.offsets.values() for t in pair]
        return sum(t.numel() * t.element_size() for t in ts)


class _Layer:
    """One value module's concatenated offsets: columns ``idx`` (C,), rows ``Z`` (C, d), owner edit per column."""

    def __init__(self, module: nn.Linear) -> None:
        self.module = module
        self.handle: RemovableHandle | None = None
        self.idx = self.Z = self.owner = None

    def rebuild(self, edits: list[RoutedEdit], layer: int) -> None:
        parts = [(i, e.offsets[layer]) for i, e in enumerate(edits) if layer in e.offsets]
        dev = self.module.weight.device
        self.idx = torch.cat([idx.to(dev) for _, (idx, _z) in parts])
        self.Z = torch.cat([z.to(dev) for _, (_i, z) in parts])
        self.owner = torch.cat([torch.full((idx.numel(),), i, dtype=torch.long, device=dev)
                                for i, (idx, _z) in parts])


class RoutedEdits:
    """All routed edits of one model and the routing layer they share; get it with :func:`routed_edits`."""

    def __init__(self, model: nn.Module, adapter: VLMAdapter, route_layer: int, window: int = 1) -> None:
        if int(window) < 1:
            raise ValueError(f"a routing window counts positions: 1 or more, got {window}")
        self._model_ref = weakref.ref(unwrap_model(model))
        self.adapter = adapter
        infos = adapter.layers(self.model)
        self.route_layer, self.window = route_layer, int(window)
        self.route_info = infos[route_layer]
        self.infos = infos
        self.edits: list[RoutedEdit] = []
        self._layers: dict[int, _Layer] = {}
        self._keys = self._key_edit = self._thresholds = None
        self.exclusive = False
        self.decision: torch.Tensor | None = None  # (B, E) bool while a routed call runs

    @property
    def model(self) -> nn.Module:
        m = self._model_ref()
        if m is None:
            raise RuntimeError("the routed model no longer exists")
        return m

    @property
    def route_point(self) -> HookPoint:
        return self.route_info.ffn_in

    def states(self, reps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """The routing states of ``reps`` (``(B, T, d)`` at the routing point; ``valid``: ``(B, T)``
        non-padding): unit rows, each the mean of its position's and the ``window - 1`` earlier valid
        positions' unit states (``window`` 1: the position's own). Keys and inputs both go through it."""
        x = torch.nn.functional.normalize(reps.detach().float(), dim=-1)
        if self.window == 1:
            return x
        m = (valid.to(x.device).float() if valid is not None else x.new_ones(x.shape[:2])).unsqueeze(-1)
        total, count = torch.cumsum(x * m, 1), torch.cumsum(m, 1)
        lag = torch.nn.functional.pad(total, (0, 0, self.window, 0))[:, :x.shape[1]]
        lag_n = torch.nn.functional.pad(count, (0, 0, self.window, 0))[:, :x.shape[1]]
        return torch.nn.functional.normalize((total - lag) / (count - lag_n).clamp_min(1.0), dim=-1)

    # -- edits ---------------------------------------------------------------------------------
    def add(self, edit: RoutedEdit) -> None:
        if edit.keys.dim() != 2 or edit.keys.shape[0] == 0:
            raise ValueError("a routed edit needs at least one key row")
        self.edits.append(edit)
        self._rebuild()

    def remove(self, tag: Hashable) -> None:
        self.edits = [e for e in self.edits if e.tag != tag]
        self._rebuild()
        if not self.edits:
            _drop(self)

    def _rebuild(self) -> None:
        used = {layer for e in self.edits for layer in e.offsets}
        for layer in list(self._layers):
            if layer not in used:
                slot = self._layers.pop(layer)
                if slot.handle is not None:
                    slot.handle.remove()
        for layer in sorted(used):
            slot = self._layers.get(layer)
            if slot is None:
                slot = self._layers[layer] = _Layer(self.infos[layer].value)
                slot.handle = slot.module.register_forward_hook(functools.partial(self._hook, layer))
            slot.rebuild(self.edits, layer)
        if self.edits:
            self._keys, self._key_edit, self._thresholds = stack_keys([e.keys for e in self.edits],
                                                                      [e.threshold for e in self.edits])
            self.exclusive = all(e.exclusive for e in self.edits)

    # -- the offsets' hook ---------------------------------------------------------------------
    def _hook(self, layer: int, module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor | None:
        decision = self.decision
        if decision is None:
            return None
        slot = self._layers[layer]
        a = args[0]
        rows = decision.shape[0]
        lead = a.shape[0]
        if lead % rows:
            raise RuntimeError(f"routed edits: {lead} rows reach layer {layer} for a decision on {rows}")
        mask = decision.to(a.device).index_select(1, slot.owner)  # (rows, C)
        cols = mask.any(0).nonzero(as_tuple=True)[0]  # only the columns of edits some row admits
        if cols.numel() == 0:
            return None
        mask = mask[:, cols].repeat_interleave(lead // rows, dim=0)  # (lead, c)
        sel = a[..., slot.idx[cols]].to(slot.Z.dtype)
        shape = (lead,) + (1,) * (sel.dim() - 2) + (cols.numel(),)
        return output + ((sel * mask.view(shape).to(sel.dtype)) @ slot.Z[cols]).to(output.dtype)

    # -- routing ---------------------------------------------------------------------------------
    def decide(self, reps: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """``(B, E)`` bool from the routing point's ``(B, T, d)`` states (``valid``: ``(B, T)`` non-padding)."""
        return self.decide_states(self.states(reps, valid), valid)

    def decide_states(self, routing: torch.Tensor, valid: torch.Tensor | None) -> torch.Tensor:
        """:meth:`decide` from routing states :meth:`states` already gave (the edit's own keys are read
        from the same states, so they are windowed once)."""
        return admitted_rows(routing, valid, self._keys, self._key_edit, self._thresholds, self.exclusive)

    @contextlib.contextmanager
    def routed(self, decision: torch.Tensor) -> Iterator[None]:
        """Run the block with ``decision`` (``(B, E)`` bool) in force."""
        old, self.decision = self.decision, decision
        try:
            yield
        finally:
            self.decision = old

    def route(self, call: Any, valid: torch.Tensor | None) -> torch.Tensor:
        """The decision for the inputs that ``call()`` (a bare-model forward) runs."""
        info = self.route_info
        points = {"r": self.route_point}
        if info.ffn_flat:
            points["shape"] = HookPoint(info.layer, "output")
        with torch.no_grad(), capture(points) as rec:
            call()
        reps = rec["r"]
        if reps.dim() == 2:
            B, T = rec["shape"].shape[:2]
            reps = reps.view(B, T, -1)
        if valid is not None and tuple(valid.shape) != tuple(reps.shape[:2]):
            valid = None  # the model grew the sequence (image tokens expanded inside): every position counts
        return self.decide(reps, valid)


_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, RoutedEdits]" = weakref.WeakKeyDictionary()


def routed_edits(model: Any, adapter: VLMAdapter | None = None, *, route_layer: int = -1, window: int = 1,
                 create: bool = True) -> RoutedEdits | None:
    """The model's routed edits (created with ``adapter``, ``route_layer`` and ``window`` when missing and
    ``create``). The edits of one model share one routing: asking an existing store for another ``window``
    is an error (its keys were made with its own)."""
    base = unwrap_model(model)
    store = _REGISTRY.get(base)
    if store is not None and create and store.window != int(window):
        raise ValueError(f"this model's {len(store.edits)} routed edits route with window {store.window}, and this "
                         f"edit asks for {window}: edit with route_window {store.window}, or restore those edits first")
    if store is not None or not create:
        return store
    if adapter is None:
        raise ValueError("routed_edits(model, adapter) needs the adapter the first time")
    store = _REGISTRY[base] = RoutedEdits(base, adapter, route_layer, window)
    return store


def _drop(store: RoutedEdits) -> None:
    """Forget an emptied store (its hooks are already gone); a newer store of the model stays."""
    model = store._model_ref()
    if model is not None and _REGISTRY.get(model) is store:
        del _REGISTRY[model]


def _valid_rows(kwargs: dict[str, Any]) -> torch.Tensor | None:
    mask = kwargs.get("attention_mask")
    return mask.bool() if torch.is_tensor(mask) and mask.dim() == 2 else None


class RoutedModel(GatedModel):
    """The base model with its routed edits: each call routes its rows, then runs them (``.model`` is the base)."""

    def __init__(self, model: nn.Module, gates: tuple[str, ...] = ("routed",)) -> None:
        super().__init__(model, gates)

    def _store(self) -> RoutedEdits | None:
        return routed_edits(self.model, create=False)

    def _run(self, fn: Any, args: tuple, kwargs: dict[str, Any], route_kwargs: dict[str, Any] | None = None) -> Any:
        """``fn(*args, **kwargs)`` with each row's routed edits, decided by a bare-model forward on
        ``route_kwargs`` (default ``kwargs``)."""
        store = self._store()
        if store is None or not store.edits:
            return fn(*args, **kwargs)
        given = kwargs if route_kwargs is None else route_kwargs
        decision = store.route(lambda: self.model(*args, **given), _valid_rows(kwargs))
        with store.routed(decision):
            return fn(*args, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(super().__call__, args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self._run(super().forward, args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        """Routes once, on the prompt (a forward without ``generate``'s own keywords), for every step."""
        prompt = {k: v for k, v in kwargs.items() if k not in _GENERATE_ONLY}
        return self._run(super().generate, args, kwargs, prompt)

    def __repr__(self) -> str:
        return f"RoutedModel(gates={list(self.gates)}, model={type(self.model).__name__})"


#: ``generate`` keywords a plain forward does not take
_GENERATE_ONLY = frozenset({"max_new_tokens", "max_length", "min_new_tokens", "do_sample", "num_beams", "temperature",
                            "top_k", "top_p", "generation_config", "streamer", "eos_token_id", "pad_token_id",
                            "num_return_sequences", "repetition_penalty", "length_penalty", "early_stopping",
                            "use_cache", "return_dict_in_generate", "output_scores", "stopping_criteria",
                            "logits_processor"})
