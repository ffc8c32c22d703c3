"""The routed model (README, "Algorithm", steps 9–12): one private state per base model and the
thin wrapper ``apply`` returns as ``edited_model``.

:class:`LDKEState` lives in the base model's ``__dict__`` (not a submodule, parameter or buffer,
so the state dict and module tree never change) and holds the edit memory, the side paths, the
Disentanglement Classifier and the routing settings. Sequential ``apply`` calls with the same
base model find it and add entries; restore removes them and, once the memory is empty, removes
the hooks and the state itself.

:class:`RoutedModel` is a core ``GatedModel`` (gate ``ldke``; ``mke_wrapped`` and ``.model``, so
adapters unwrap it): calling it (or its ``forward`` / ``generate``) routes each row: pass 1 reads
phi(x) with every delta off and stops after layer f; the exact-match guard or the head picks at
most one entry per row (s* >= tau; in the lifelong mode, ``scope_threshold``, only among the entries whose
input scope admits the row, read in the same pass at the last layer's FFN input); pass 2 runs the full
forward with only that entry's deltas on that row. ``generate`` routes once at prefill and keeps the
route for every decoding step. Other attributes are the base model's. The base model's own ``forward`` stays original.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch
from torch import nn

from mke_plugins.adapters.base import Batch, HookPoint, VLMAdapter, unwrap_model
from mke_plugins.core.scope import admitted_rows, stack_keys
from mke_plugins.core.wrap import GatedModel, gate_open, is_gate_open

from .inputs import InputsView, view_of
from .router import Features, RouterHead, hidden_features
from .side import EditEntry, EditMemory, SidePaths

STATE_ATTR = "_mke_ldke_state"
GATE = "ldke"
#: relative tolerance of the exact-match guard's image comparison (float noise of batching)
IMAGE_MATCH_RTOL = 1e-3


@dataclass
class RouteSettings:
    router: bool = True
    exact_match_guard: bool = True
    prefilter: int = 16
    tau: float = 0.5
    scope_threshold: float | None = None  # lifelong mode: entries act only inside their input scopes


@dataclass
class RouteDecision:
    """Per row: the entry chosen (or ``None``), why, and the best head score."""

    entries: list[list[int]]
    reasons: list[str]
    scores: list[float | None] = field(default_factory=list)


class LDKEState:
    """Everything LDKE keeps on a base model between ``apply`` calls."""

    def __init__(self, model: nn.Module, adapter: VLMAdapter, tok: Any, feature_layer: int,
                 head: RouterHead | None, archive: dict[str, Any] | None, settings: RouteSettings) -> None:
        self.model = model
        self.adapter = adapter
        self.tok = tok
        self.feature_layer = feature_layer
        self.head = head
        self.archive = archive
        self.settings = settings
        self.memory = EditMemory()
        layers = adapter.layers(model)
        self.side = SidePaths(layers, self.memory, gate=lambda: is_gate_open(model, GATE))
        self._scope_at = layers[-1].ffn_in  # where the lifelong scopes are read: the last layer's FFN input
        self.last_decision: RouteDecision | None = None
        #: stacked scope keys of the scoped entries: (entry ids, keys, owner, thresholds)
        self._scope_cache: tuple[tuple[int, ...], torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    # -- attach / detach ---------------------------------------------------------------------
    @staticmethod
    def of(model: nn.Module) -> "LDKEState | None":
        return unwrap_model(model).__dict__.get(STATE_ATTR)

    def attach(self) -> None:
        self.model.__dict__[STATE_ATTR] = self

    def detach(self) -> None:
        self.side.uninstall()
        if self.model.__dict__.get(STATE_ATTR) is self:
            del self.model.__dict__[STATE_ATTR]

    # -- entries -------------------------------------------------------------------------------
    def add(self, entry: EditEntry) -> None:
        self.memory.add(entry)
        self.side.install(entry.layers)

    def remove(self, ids: Sequence[int]) -> None:
        """Undo entries (restore); the last removal takes the hooks and the state off the model."""
        self.memory.remove(ids)
        if len(self.memory) == 0:
            self.detach()

    def project(self, phi: torch.Tensor) -> torch.Tensor | None:
        if self.head is None:
            return None
        with torch.no_grad():
            return self.head.project(phi.to(next(self.head.parameters()).device))

    # -- features and routing --------------------------------------------------------------------
    def features(self, view: InputsView) -> Features:
        """phi of ``view`` with every delta off (pass 1, stopped after layer f)."""
        saved = self.side._groups, self.side._batch
        self.side.clear_route()
        try:
            with torch.no_grad():
                feats, _ = hidden_features(self.adapter, self.model, view, self.feature_layer, stop_early=True,
                                           scope_point=self.scope_point())
        finally:
            self.side._groups, self.side._batch = saved
        return feats

    def scope_point(self) -> HookPoint | None:
        """Where scopes are read (the last decoder layer's FFN input), when the lifelong scope is on."""
        return None if self.settings.scope_threshold is None else self._scope_at

    def _in_scope(self, feats: Features, valid: torch.Tensor | None, entries: list[EditEntry]) -> torch.Tensor | None:
        """``(rows, entries)`` bool: the entries whose scope admits some valid position of the row (an entry
        without a scope admits every row); None when no entry has a scope or no scope states were read."""
        scoped = [j for j, e in enumerate(entries) if e.scope is not None]
        states = feats.scope_states
        if not scoped or states is None:
            return None
        ids = tuple(entries[j].id for j in scoped)
        if self._scope_cache is None or self._scope_cache[0] != ids:
            scopes = [entries[j].scope for j in scoped]
            self._scope_cache = (ids, *stack_keys([sc.keys for sc in scopes], [sc.threshold for sc in scopes]))
        _, keys, owner, thresholds = self._scope_cache
        allowed = torch.ones(states.shape[0], len(entries), dtype=torch.bool)  # an unscoped entry admits every row
        allowed[:, scoped] = admitted_rows(states, valid, keys, owner, thresholds).cpu()
        return allowed

    def _exact(self, feats: Features, row: int) -> int | None:
        toks, has_img, img = feats.prompt_tokens[row], bool(feats.has_image[row]), feats.image_mean[row]
        for e in self.memory:
            if e.prompt_tokens != toks or e.has_image != has_img:
                continue
            if has_img:
                ref = e.image_mean.to(img.device)
                if float((img - ref).norm()) > IMAGE_MATCH_RTOL * max(float(ref.norm()), 1e-12):
                    continue
            return e.id
        return None

    def route(self, feats: Features, valid: torch.Tensor | None = None) -> RouteDecision:
        """Per row, the entry whose deltas run (at most one unless the router is off); ``valid``: the rows'
        non-padding positions for the scopes (None: every position)."""
        n = feats.phi.shape[0]
        entries = list(self.memory)
        if not entries:
            return RouteDecision([[] for _ in range(n)], ["empty"] * n, [None] * n)
        if not self.settings.router:
            ids = [e.id for e in self.memory.active()]
            return RouteDecision([list(ids) for _ in range(n)], ["router off"] * n, [None] * n)
        out, reasons, scores = [], [], []
        keys = torch.stack([e.key_w for e in entries]) if self.head is not None else None
        u = self.project(feats.phi) if self.head is not None else None
        allowed = self._in_scope(feats, valid, entries)
        for b in range(n):
            if self.settings.exact_match_guard:
                j = self._exact(feats, b)
                if j is not None:
                    out.append([self.memory.resolve(j)])
                    reasons.append("exact")
                    scores.append(None)
                    continue
            if keys is None or u is None:
                out.append([])
                reasons.append("no head")
                scores.append(None)
                continue
            n_allowed = len(entries) if allowed is None else int(allowed[b].sum())
            if n_allowed == 0:
                out.append([])
                reasons.append("outside scopes")
                scores.append(None)
                continue
            with torch.no_grad():
                ub = u[b]
                cos = torch.nn.functional.cosine_similarity(keys, ub.unsqueeze(0), dim=-1)
                if allowed is not None:
                    cos = cos.masked_fill(~allowed[b].to(cos.device), float("-inf"))
                cand = cos.topk(min(self.settings.prefilter, n_allowed)).indices
                s = torch.sigmoid(self.head.logit(ub.unsqueeze(0), keys[cand]))
                best = int(s.argmax())
                s_star = float(s[best])
            scores.append(s_star)
            if s_star >= self.settings.tau:
                out.append([self.memory.resolve(entries[int(cand[best])].id)])
                reasons.append("head")
            else:
                out.append([])
                reasons.append("original")
        return RouteDecision(out, reasons, scores)

    # -- calls -----------------------------------------------------------------------------------
    def _decide(self, view: InputsView) -> RouteDecision:
        if not self.settings.router:  # no pass 1 needed: every row takes every active entry
            ids = [e.id for e in self.memory.active()]
            n = view.batch_size
            return RouteDecision([list(ids) for _ in range(n)], ["router off"] * n, [None] * n)
        return self.route(self.features(view), view.valid_mask)

    def call(self, args: tuple, kwargs: dict) -> Any:
        if len(self.memory) == 0:
            return self.model(*args, **kwargs)
        decision = self._decide(view_of(self.adapter, self.model, self.tok, args, kwargs))
        self.last_decision = decision
        self.side.set_route(decision.entries)
        try:
            return self.model(*args, **kwargs)
        finally:
            self.side.clear_route()

    def generate(self, args: tuple, kwargs: dict) -> Any:
        if len(self.memory) == 0:
            return self.model.generate(*args, **kwargs)
        tensors = {k: v for k, v in kwargs.items() if torch.is_tensor(v)}
        view = view_of(self.adapter, self.model, self.tok, args[:1] if args and torch.is_tensor(args[0]) else (),
                       tensors)
        decision = self._decide(view)
        self.last_decision = decision
        self.side.set_route(decision.entries)
        try:
            return self.model.generate(*args, **kwargs)
        finally:
            self.side.clear_route()

    def batch_view(self, batch: Batch) -> InputsView:
        """The view of an adapter ``Batch`` (its labels give the prompt positions)."""
        if "samples" in batch.inputs:
            return view_of(self.adapter, self.model, self.tok, (batch.inputs["samples"],), {})
        return view_of(self.adapter, self.model, self.tok, (), {**batch.inputs, "labels": batch.labels})


class RoutedModel(GatedModel):
    """What ``apply`` returns: a core ``GatedModel`` (gate ``ldke``) whose calls route per row."""

    def __init__(self, model: nn.Module, state: LDKEState) -> None:
        super().__init__(model, [GATE])
        object.__setattr__(self, "ldke", state)

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with gate_open(self.model, *self.gates):
            return self.ldke.call(args, kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with gate_open(self.model, *self.gates):
            return self.ldke.call(args, kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with gate_open(self.model, *self.gates):
            return self.ldke.generate(args, kwargs)

    def __repr__(self) -> str:
        return f"RoutedModel(LDKE, {len(self.ldke.memory)} edits, {type(self.model).__name__})"
