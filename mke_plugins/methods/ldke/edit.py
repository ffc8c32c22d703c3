"""One LDKE edit, end to end (README, "Algorithm", steps 1–8): localize, key, fit, store.

For each request: Fast Localization picks S_e on the paired edit query; the key phi(e) and the
exact-match fingerprint are read with every delta off; a new memory entry gets rank-r factors
on S_e, which are fitted alone (earlier entries off) with Adam on
NLL(y_e | v_e, t_e) + lambda_norm sum ||B A||_F^2 (+ optional locality KL), gradient clip 1.0,
stopping once every target token is argmax-correct and the NLL is below ``stop_nll``. If the edit
input is an earlier edit's own input (exact match; or, with ``supersede_threshold`` set, routes to
it with at least that head score), the new entry supersedes it (a re-edit of the fact).

The archive (head, tau, mu) is loaded once per path and cached.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mke_hooks import HparamsError, RequestError
from mke_plugins.adapters.base import Query, VLMAdapter, unwrap_model
from mke_plugins.core.augment import edit_seed, noisy_copies
from mke_plugins.core.finite import check_finite
from mke_plugins.core.hooks import HookSet
from mke_plugins.core.modes import frozen
from mke_plugins.core.replay import prefix_replay
from mke_plugins.core.requests import query_of
from mke_plugins.core.scope import InputScope
from mke_plugins.core.wrap import gate_open

from .localize import Localization, check_layers, localize
from .routed import GATE, LDKEState, RouteSettings
from .router import archive_mu, check_fingerprint, feature_layer_index, fingerprint, head_from_archive, load_archive
from .side import EditEntry, new_factors


@dataclass
class EditReport:
    """What one edit did (attached to ``weights_copy.stats`` for the bench)."""

    entry: int
    layers: list[int]
    localization: Localization
    steps: int
    final_nll: float
    success: bool
    superseded: int | None
    seconds: dict[str, float] = field(default_factory=dict)
    reference: Localization | None = None

    def stats(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "layers": ",".join(map(str, self.layers)), "top_layer": str(self.localization.top),
            "localization": self.localization.method, "steps": self.steps, "final_nll": self.final_nll,
            "fit_success": self.success, "supersedes": self.superseded is not None,
            "localize_seconds": self.seconds.get("localize"), "update_seconds": self.seconds.get("update"),
            "key_seconds": self.seconds.get("key"),
            "localize_forward_equivalents": self.localization.forward_equivalents,
        }
        if self.reference is not None:
            ref = self.reference
            out.update({
                "full_trace_seconds": ref.seconds, "full_trace_top_layer": str(ref.top),
                "full_trace_forward_equivalents": ref.forward_equivalents,
                "same_top_layer": ref.top == self.localization.top,
                "topk_agreement": len(set(ref.layers) & set(self.layers)) / max(1, len(self.layers)),
                "full_trace_to_localize_ratio": ref.seconds / max(self.seconds.get("localize", 0.0), 1e-9),
            })
        return out


@lru_cache(maxsize=8)
def _cached_archive(path: str, mtime: float) -> dict[str, Any]:
    return load_archive(path)


def archive_for(hparams: Any) -> dict[str, Any] | None:
    """The hparams' archive (cached per path and modification time), or None when not needed."""
    if not hparams.needs_archive() and not hparams.classifier_archive:
        return None
    path = hparams.classifier_archive
    if not path or not Path(str(path)).is_file():
        return load_archive(path)  # raises the clear missing-archive error
    return _cached_archive(str(path), Path(str(path)).stat().st_mtime)


def state_for(model: nn.Module, tok: Any, hparams: Any, adapter: VLMAdapter) -> LDKEState:
    """The model's LDKE state, created on the first edit; settings follow the latest hparams."""
    base = unwrap_model(model)
    n_layers = len(adapter.layers(base))
    check_layers(n_layers, hparams.top_k, hparams.fixed_layers)
    if hparams.features != "hidden":
        raise HparamsError("features: clip routes on CLIP embeddings of the raw image and prompt, which a routed "
                           "forward call does not receive; this build routes on the model's own states only.",
                           key="features", fix="set features: hidden.")
    f = feature_layer_index(n_layers, hparams.feature_layer)
    archive = archive_for(hparams)
    head = None
    if archive is not None:
        check_fingerprint(archive, fingerprint(adapter, base, hparams.feature_layer, hparams.features))
        if hparams.router:
            device = next(base.parameters()).device
            head = head_from_archive(archive, device)
    tau = hparams.route_threshold if hparams.route_threshold is not None else \
        float(archive.get("tau", 0.5)) if archive is not None else 0.5
    settings = RouteSettings(router=hparams.router, exact_match_guard=hparams.exact_match_guard,
                             prefilter=hparams.prefilter, tau=float(tau), scope_threshold=hparams.scope_threshold)
    state = LDKEState.of(base)
    if state is None:
        state = LDKEState(base, adapter, tok, f, head, archive, settings)
        state.attach()
        return state
    if state.feature_layer != f or (archive is not None and state.archive is not None
                                    and archive.get("path") != state.archive.get("path")):
        raise HparamsError(f"this model already holds {len(state.memory)} LDKE edits made with another "
                           f"classifier archive or feature layer.", key="classifier_archive",
                           fix="restore those edits first (their weights_copy), or keep the same hparams.")
    state.settings = settings
    state.tok = tok
    if head is not None and state.head is None:
        state.head = head
        for e in state.memory:
            e.key_w = state.project(e.key_phi.unsqueeze(0))[0]
    return state


def _loc_kl_batch(state: LDKEState, hparams: Any) -> Any:
    items = list((state.archive or {}).get("loc_prompts") or [])[: hparams.loc_kl_samples]
    if not items:
        raise HparamsError("loc_kl_weight > 0 needs training-split prompts in the archive (loc_prompts).",
                           key="loc_kl_weight", fix="rebuild the archive with `mke-plugins train LDKE`, or set "
                           "loc_kl_weight: 0.")
    queries = [Query(None, it["prompt"], it["answer"]) for it in items]
    return state.adapter.batch(state.model, state.tok, queries)


#: what to change when the fit's loss is no longer finite
FIX = "lower `edit_lr`, `weight_norm` or `loc_kl_weight`, or load the model in float32."


def fit(state: LDKEState, entry: EditEntry, batch: Any, hparams: Any) -> tuple[int, float, bool]:
    """Fit ``entry``'s factors on ``batch`` alone; returns (steps, final NLL, success)."""
    adapter, base = state.adapter, state.model
    copies = noisy_copies(adapter, base, state.tok, batch, copies=hparams.fit_copies, noise=hparams.fit_noise,
                          seed=edit_seed(hparams.seed, entry.id))
    if copies is not None:
        batch = copies.batch
    params = entry.parameters()
    opt = torch.optim.Adam(params, lr=hparams.edit_lr)
    loc_batch = _loc_kl_batch(state, hparams) if hparams.loc_kl_weight > 0 else None
    loc_ref = None
    if loc_batch is not None:
        with torch.no_grad():
            loc_ref = adapter.forward(base, loc_batch).float().log_softmax(-1)
    steps, nll_value, ok = 0, float("nan"), False
    # without fit noise nothing below the entry's lowest layer changes: re-run only the layers from there up
    start = min(entry.layers) if hparams.prefix_replay and copies is None and entry.layers else None
    with frozen(base, eval_mode=False), gate_open(base, GATE), HookSet() as hooks, \
            prefix_replay(adapter, base, start) as replayed:
        if copies is not None:
            hooks.add(copies.point, copies.add_noise)
        for steps in range(hparams.edit_steps + 1):
            state.side.set_route([[entry.id]] * len(batch))
            try:
                answers = replayed.answer_logits(base, batch)
                nll = answers.loss()
                ok = bool(answers.success().all())
                nll_value = float(nll.detach())
                check_finite("LDKE", steps + 1, nll=nll, fix=FIX)
                if (ok and nll_value < hparams.stop_nll) or steps == hparams.edit_steps:
                    break
                loss = nll + hparams.weight_norm * entry.norm_penalty().to(nll.device)
                if loc_batch is not None:
                    state.side.set_route([[entry.id]] * len(loc_batch))
                    post = replayed.forward(base, loc_batch).float().log_softmax(-1)
                    m = loc_batch.attention_mask.bool().to(post.device)
                    kl = (loc_ref.exp() * (loc_ref - post)).sum(-1)[m].mean()
                    loss = loss + hparams.loc_kl_weight * kl
            finally:
                state.side.clear_route()
            grads = torch.autograd.grad(loss, params, allow_unused=True)
            for p, g in zip(params, grads, strict=True):
                p.grad = torch.zeros_like(p) if g is None else g
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            opt.zero_grad(set_to_none=True)
    for p in params:
        p.requires_grad_(False)
        p.grad = None
    return steps, nll_value, ok


def edit_one(state: LDKEState, request: dict[str, Any], hparams: Any, index: int = 0) -> EditReport:
    """Apply one request: localize, key, supersede check, fit; the entry stays in the memory."""
    adapter, base, tok = state.adapter, state.model, state.tok
    infos = adapter.layers(base)
    query = query_of(request)
    batch = adapter.batch(base, tok, [query])
    if not bool(batch.target_mask.any()):
        raise RequestError("tokenises to no target positions", field="target", index=index)
    seconds: dict[str, float] = {}
    mu = None
    if hparams.layer_prior == "archive" or (hparams.localization == "fixed" and hparams.fixed_layers is None):
        mu = archive_mu(state.archive, len(infos))
    t0 = time.perf_counter()
    loc = localize(adapter, base, tok, batch, hparams, mu)
    seconds["localize"] = time.perf_counter() - t0
    reference = None
    if hparams.compare_localization:
        reference = localize(adapter, base, tok, batch, hparams, mu, method="full_trace")
    t0 = time.perf_counter()
    view = state.batch_view(batch)
    feats = state.features(view)
    superseded = None
    if len(state.memory) and hparams.router:
        decision = state.route(feats, view.valid_mask)
        reason, score = decision.reasons[0], decision.scores[0]
        by_head = hparams.supersede_threshold is not None and score is not None \
            and score >= max(state.settings.tau, hparams.supersede_threshold)
        if decision.entries[0] and (reason == "exact" or by_head):
            superseded = decision.entries[0][0]
    seconds["key"] = time.perf_counter() - t0
    gen = torch.Generator().manual_seed(int(hparams.seed) + 7919 * len(state.memory))
    A, B = {}, {}
    for layer in loc.layers:
        A[layer], B[layer] = new_factors(infos[layer], hparams.delta_rank, gen)
    phi = feats.phi[0].detach()
    entry = EditEntry(id=state.memory.new_id(), layers=list(loc.layers), A=A, B=B, key_phi=phi,
                      key_w=None, prompt_tokens=feats.prompt_tokens[0], image_mean=feats.image_mean[0].detach(),
                      has_image=bool(feats.has_image[0]), target=request["target"])
    if state.head is not None:
        entry.key_w = state.project(phi.unsqueeze(0))[0]
    if hparams.scope_threshold is not None and feats.scope_states is not None:  # lifelong mode
        answer = batch.answer_mask[0].to(feats.scope_states.device)
        entry.scope = InputScope.around(feats.scope_states[0][answer[: feats.scope_states.shape[1]]],
                                        float(hparams.scope_threshold))
    state.add(entry)
    t0 = time.perf_counter()
    try:
        steps, nll, ok = fit(state, entry, batch, hparams)
    except BaseException:
        state.remove([entry.id])  # a half-trained entry must never answer later queries
        raise
    seconds["update"] = time.perf_counter() - t0
    if superseded is not None:
        state.memory.supersede(superseded, entry.id)
    report = EditReport(entry.id, list(loc.layers), loc, steps, nll, ok, superseded, seconds, reference)
    entry.stats = report.stats()
    return report


def clear(model: nn.Module) -> int:
    """Remove every LDKE edit from ``model`` (hooks and state); returns how many there were."""
    state = LDKEState.of(model)
    if state is None:
        return 0
    n = len(state.memory)
    state.remove([e.id for e in list(state.memory)])
    return n
