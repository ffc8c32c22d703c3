"""``LDKERouterTrainable``: the one training implementation of the Disentanglement Classifier
(README, "The archive and its training"), an EasyEdit ``EditableModel``.

EasyEdit's ``MultimodalTrainer`` (registered as trainable algorithm ``LDKE``) and
``mke-plugins train LDKE`` (through the testing kit's stand-in trainer when EasyEdit is absent)
drive this same class:

* ``forward(batch)``: the base logits, LDKE off.
* ``edit(edit_inner, cond)``: the key phi(e) of each edit row (no gradient) and a routed model;
  during the first ``prior_edits`` training edits it also runs Fast Localization's forward and
  backward on ``edit_inner`` and accumulates the layer baseline mu (activation gradients only).
* The routed model returns z + s(x, e) * beta at each row's own answer tokens and at edit e's
  target tokens, at the row's answer positions (z: base logits, no gradient; beta =
  ``trainer_boost``), at both label alignments EasyEdit's losses use (HF unshifted, LAVIS
  shifted); its ``attention_mask`` marks those positions, which EasyEdit's KL then averages
  over. So cedit * NLL(edit_outer) + iedit * NLL(edit_outer_image) falls as s -> 1 and
  cloc * (KL(loc) + KL(loc_image)) rises with s: a relevance loss on the head, which holds the
  only outer parameters. (Boosting only a negative row's own answer, which a trained model
  already predicts with near certainty, would leave the KL flat: routing a negative to e would
  make it answer e's target, so that is what the KL measures.) Row ``r`` of a part with ``k``
  rows per edit is paired with edit ``r // k``.
* ``state_dict()`` *is* the LDKE archive (format, fingerprint, head, tau, mu, metadata, routing
  rates); ``load_state_dict`` reads one back. ``routing_validation`` / ``calibrate`` score a
  validation set and set tau.

EasyEdit's ``EditableModel`` is subclassed when ``easyeditor`` is already imported; otherwise a
standalone base implements the same interface (``hooks/EASYEDIT-NOTES.md``, "MultimodalTrainer and
EditableModel"), so CI needs no EasyEdit.
"""

from __future__ import annotations

import copy
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Iterable, Sequence

import torch
from torch import nn

from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import Query, unwrap_model

from .inputs import InputsView, host_batch_call
from .localize import gradient_scores, shares
from .router import (
    RouterHead,
    calibrate_threshold,
    feature_layer_index,
    fingerprint,
    hidden_features,
    make_archive,
    rates,
)

LAVIS_NAMES = ("blip2", "minigpt4")


def _is_lavis(config: Any) -> bool:
    name = getattr(config, "model_name", "")
    return isinstance(name, str) and name.strip().lower() in LAVIS_NAMES


def masked_log_probs(pred: torch.Tensor, targ: torch.Tensor, shift: bool) -> dict[str, torch.Tensor]:
    """Token NLL / accuracy over ``targ != -100`` (EasyEdit's multimodal convention for ``shift``)."""
    pred = pred.float()
    if shift:
        pred, targ = pred[:, :-1], targ[:, 1:]
    mask = targ != -100
    tg = targ.masked_fill(~mask, 0)
    lp = pred.log_softmax(-1).gather(-1, tg.unsqueeze(-1)).squeeze(-1)
    n = mask.float().sum().clamp_min(1.0)
    log_prob = (lp * mask).sum() / n
    acc = ((pred.argmax(-1) == tg) & mask).float().sum() / n
    return {"acc": acc, "log_prob": log_prob, "prob": (lp.exp() * mask).sum() / n, "nll": -log_prob, "n_tokens": n}


class StandaloneEditableModel(nn.Module):
    """EasyEdit's ``EditableModel`` interface (``hooks/EASYEDIT-NOTES.md``) for use without EasyEdit."""

    def __init__(self, model: nn.Module, config: Any, model_constructor: Any) -> None:
        super().__init__()
        self.model = model
        self.config = copy.deepcopy(config)
        self.model_constructor = model_constructor
        lavis = _is_lavis(config)

        def edit_loss_fn(config: Any, pred: torch.Tensor, targ: torch.Tensor, **kwargs: Any) -> dict:
            return masked_log_probs(pred, targ, shift=lavis)

        self.edit_loss_fn = edit_loss_fn
        self.loc_loss_fn = edit_loss_fn

    def outer_parameters(self) -> Iterable[nn.Parameter]:
        return self.parameters()


def _editable_base() -> type:
    if "easyeditor" in sys.modules:
        try:
            from easyeditor.trainer.algs.editable_model import EditableModel  # type: ignore

            return EditableModel
        except Exception:  # noqa: BLE001 - a broken EasyEdit install falls back to the standalone base
            pass
    return StandaloneEditableModel


@dataclass
class RoutedOutput:
    """What the routed model returns to EasyEdit's ``edit_step``."""

    logits: torch.Tensor
    labels: torch.Tensor | None = None
    attention_mask: torch.Tensor | None = None  # the boosted positions (EasyEdit's KL mask)


def _output_logits(out: Any) -> torch.Tensor:
    return out if torch.is_tensor(out) else out.logits


def _alignments(labels: torch.Tensor) -> list[torch.Tensor]:
    """The labels as read by an unshifted loss (``logits[t]`` vs ``labels[t]``) and a shifted one."""
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    return [labels, shifted]


def _edit_tokens(targets: Sequence[Sequence[int]], rows: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, T) ids: at the k-th masked position of row b, token k of its edit's target (last one repeated)."""
    width = max(len(t) for t in targets)
    table = torch.tensor([list(t) + [t[-1]] * (width - len(t)) for t in targets], device=mask.device)
    lengths = torch.tensor([len(t) for t in targets], device=mask.device)
    rank = (mask.long().cumsum(1) - 1).clamp_min(0)
    rank = torch.minimum(rank, (lengths[rows] - 1).unsqueeze(1))
    return table[rows.unsqueeze(1).expand_as(rank), rank]


def _boost(z: torch.Tensor, labels: torch.Tensor, s: torch.Tensor, beta: float,
           targets: Sequence[Sequence[int]], rows: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """z plus s * beta at each row's own answer tokens and its edit's target tokens; the boosted mask."""
    out = z
    boosted = torch.zeros(labels.shape, dtype=torch.bool, device=labels.device)
    for lab in _alignments(labels):
        mask = lab != -100
        boosted |= mask
        src = (s.view(-1, 1, 1) * beta * mask.unsqueeze(-1)).to(z.dtype)
        out = out.scatter_add(-1, lab.clamp_min(0).unsqueeze(-1), src)
        out = out.scatter_add(-1, _edit_tokens(targets, rows, mask).unsqueeze(-1), src)
    return out, boosted


class LDKERouterTrainable(_editable_base()):
    """The Disentanglement Classifier as an EasyEdit trainable algorithm (see the module docstring)."""

    def __init__(self, model: nn.Module, config: Any, model_constructor: Any = None) -> None:
        super().__init__(model, config, model_constructor)
        self.adapter = get_adapter(model, config)
        infos = self.adapter.layers(unwrap_model(model))
        self.n_layers = len(infos)
        self.fingerprint = fingerprint(self.adapter, model, config.feature_layer, config.features)
        self.f = feature_layer_index(self.n_layers, config.feature_layer)
        gen_state = torch.random.get_rng_state()
        torch.manual_seed(int(getattr(config, "seed", 0)))
        self.head = RouterHead(self.fingerprint["feature_dim"], config.proj_dim, config.head_hidden, config.head)
        torch.random.set_rng_state(gen_state)
        self.head.to(next(unwrap_model(model).parameters()).device)
        self.beta = float(config.trainer_boost)
        self.prior_edits = int(config.prior_edits)
        self.score_modules = config.score_modules
        self.mu_sum = torch.zeros(self.n_layers, dtype=torch.float64)
        self.mu_count = 0
        self.tau = 0.5
        self.val_rates: dict[str, Any] = {}
        self.meta: dict[str, Any] = {}
        self.loc_prompts: list[dict[str, str]] = []
        self.tok: Any = None

    # -- EditableModel interface -------------------------------------------------------------
    def outer_parameters(self) -> list[nn.Parameter]:
        return list(self.head.parameters())

    def _tok(self) -> Any:
        if self.tok is None:
            from mke_plugins.adapters.processors import load_processor

            self.tok = load_processor(self.config.name)
        return self.tok

    def _view(self, batch: Any) -> InputsView:
        tok = self.tok
        needs_tok = not (isinstance(batch, Mapping) and torch.is_tensor(batch.get("labels"))
                         and torch.is_tensor(batch.get("input_ids"))
                         and batch["labels"].shape == batch["input_ids"].shape)
        if needs_tok and tok is None and not _is_lavis(self.config):
            tok = self._tok()
        return host_batch_call(self.adapter, self.model, tok, batch)

    def forward(self, batch: Any, *args: Any, **kwargs: Any) -> torch.Tensor:
        with torch.no_grad():
            return _output_logits(self._view(batch).call(self.model))

    def edit(self, batch: Any, condition: Any = None, detach_history: bool = False, **kwargs: Any
             ) -> tuple["RelevanceModel", dict[str, float]]:
        view = self._view(batch)
        with torch.no_grad():
            feats, out = hidden_features(self.adapter, self.model, view, self.f, stop_early=view.labels is not None)
        labels = view.labels if view.labels is not None else getattr(out, "labels", None)
        if labels is None:
            raise ValueError("LDKE trainer: edit_inner has no sequence-aligned labels (HF parts need `labels` "
                             "shaped like input_ids; LAVIS wrappers return `.labels`)")
        targets = [[int(t) for t in row[row != -100].tolist()] or [0] for row in labels]
        if self.training and self.mu_count < self.prior_edits:
            self._accumulate_mu(view)
        return RelevanceModel(self, feats.phi, targets), {"mu_count": float(self.mu_count)}

    def _accumulate_mu(self, view: InputsView) -> None:
        def run() -> tuple[torch.Tensor, torch.Tensor]:
            out = view.call(self.model)
            labels = view.labels if view.labels is not None else getattr(out, "labels", None)
            if labels is None:
                raise ValueError("LDKE mu: the edit_inner batch has no sequence-aligned labels")
            return _output_logits(out), labels

        raw = gradient_scores(self.adapter, self.model, run, view.batch_size, self.score_modules)
        p = shares(raw).double().cpu()
        take = min(self.prior_edits - self.mu_count, p.shape[0])
        self.mu_sum += p[:take].sum(0)
        self.mu_count += take

    def accumulate_mu(self, keys: Sequence[Query], chunk: int = 8) -> None:
        """Average the layer shares of these edit inputs into mu (up to ``prior_edits``), outside a trainer loop."""
        from .data import host_part

        for i in range(0, len(keys), chunk):
            if self.mu_count >= self.prior_edits:
                break
            batch = self.adapter.batch(self.model, self._tok(), list(keys[i:i + chunk]))
            self._accumulate_mu(self._view(host_part(batch)))

    # -- scoring, validation, calibration ------------------------------------------------------
    def phi(self, queries: Sequence[Query], chunk: int = 32) -> torch.Tensor:
        """phi of adapter queries (no gradient), in chunks."""
        from .data import host_part

        out = []
        with torch.no_grad():
            for i in range(0, len(queries), chunk):
                batch = self.adapter.batch(self.model, self._tok(), list(queries[i:i + chunk]))
                feats, _ = hidden_features(self.adapter, self.model, self._view(host_part(batch)), self.f)
                out.append(feats.phi)
        return torch.cat(out)

    def score_records(self, records: Sequence[Any]) -> dict[str, list[float]]:
        """Head scores s(x, e) of every positive / hard / easy input against its record's key."""
        out: dict[str, list[float]] = {"positive": [], "hard": [], "easy": []}
        self.head.eval()
        with torch.no_grad():
            for rec in records:
                groups = {"positive": rec.positives + rec.image_positives, "hard": rec.hard, "easy": rec.easy}
                queries = [rec.key] + [q for g in groups.values() for q in g]
                phis = self.phi(queries)
                s = self.head(phis[1:], phis[:1]).tolist()
                i = 0
                for name, g in groups.items():
                    out[name] += s[i:i + len(g)]
                    i += len(g)
        self.head.train(self.training)
        return out

    def routing_validation(self, records: Sequence[Any]) -> dict[str, Any]:
        """Balanced accuracy (positives vs hard negatives) at the best grid threshold, and the rates."""
        scores = self.score_records(records)
        tau, bacc = calibrate_threshold(scores["positive"], scores["hard"] or scores["easy"])
        return {"tau": tau, "balanced_accuracy": bacc,
                **{f"rate/{k}": v for k, v in rates(scores["positive"], scores["hard"], scores["easy"], tau).items()}}

    def calibrate(self, val_set: Any) -> dict[str, Any]:
        """Set tau from a validation set (a routing dataset or a list of routing records)."""
        records = getattr(val_set, "records", val_set)
        result = self.routing_validation(records)
        self.tau = float(result["tau"])
        self.val_rates = result
        return result

    def mu(self) -> torch.Tensor | None:
        return None if self.mu_count == 0 else (self.mu_sum / self.mu_count).float()

    # -- the archive -------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return make_archive(self.head, self.fingerprint, tau=self.tau, mu=self.mu(), mu_count=self.mu_count,
                            meta=self.meta, val_rates=self.val_rates, loc_prompts=self.loc_prompts)

    def load_state_dict(self, state_dict: dict[str, Any], strict: bool = True, **kwargs: Any) -> Any:  # type: ignore[override]
        from .router import check_fingerprint

        check_fingerprint(state_dict, self.fingerprint, field="archive")
        self.head.load_state_dict(state_dict["head"]["state"])
        self.tau = float(state_dict.get("tau", 0.5))
        mu = state_dict.get("mu")
        self.mu_count = int(state_dict.get("mu_count", 0)) if mu is not None else 0
        self.mu_sum = (mu.double() * self.mu_count) if mu is not None else torch.zeros(self.n_layers,
                                                                                         dtype=torch.float64)
        self.meta = dict(state_dict.get("meta", {}))
        self.val_rates = dict(state_dict.get("val_rates", {}))
        self.loc_prompts = list(state_dict.get("loc_prompts", []))
        return None


class RelevanceModel:
    """The edited model of a training step: base logits plus the routing score's boost."""

    def __init__(self, owner: LDKERouterTrainable, keys: torch.Tensor, targets: Sequence[Sequence[int]]) -> None:
        self.owner = owner
        self.keys = keys
        self.targets = [list(t) for t in targets]

    def __call__(self, batch: Any, *args: Any, **kwargs: Any) -> RoutedOutput:
        o = self.owner
        view = o._view(batch)
        with torch.no_grad():
            feats, out = hidden_features(o.adapter, o.model, view, o.f, stop_early=False)
        z = _output_logits(out).detach()
        labels = view.labels if view.labels is not None else getattr(out, "labels", None)
        if labels is None:
            raise ValueError("LDKE trainer: a batch part has no sequence-aligned labels (HF parts need `labels` "
                             "shaped like input_ids; LAVIS wrappers return `.labels`)")
        n, k = self.keys.shape[0], view.batch_size
        if k % n:
            raise ValueError(f"LDKE trainer: a part has {k} rows for {n} edits; rows must come in equal blocks "
                             f"per edit (record-major)")
        rows = torch.arange(n, device=z.device).repeat_interleave(k // n)
        s = o.head(feats.phi, self.keys[rows.to(self.keys.device)])
        logits, boosted = _boost(z, labels.to(z.device), s.to(z.device), o.beta, self.targets, rows)
        return RoutedOutput(logits, getattr(out, "labels", None) if view.labels is None else None, boosted.float())
