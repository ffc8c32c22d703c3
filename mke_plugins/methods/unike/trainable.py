"""UniKE's offline stage inside EasyEdit's ``MultimodalTrainer`` (README, "Offline stage": the second driver).

``UniKETrainable`` is registered as ``ALG_TRAIN_DICT["UNIKE"]`` (the training YAML has
``alg: UniKE``). It drives the same :class:`~.offline.UniKEOffline` the CLI uses:

* ``outer_parameters()`` are the encoder parameters only; the base model stays frozen (eval
  mode, no gradients);
* ``edit(batch, cond)`` observes ``edit_inner`` (training batches join the bank the first time
  they are seen, validation batches never), computes the contrastive loss L on the batch filled
  up to ``enc_batch_size`` by replay, and returns the frozen model as the "edited" callable with
  ``unike/*`` info keys; with ``include_variants`` that callable also banks the rephrased
  question and rephrased image batches the trainer passes through it (recognised by carrying the
  same target ids);
* ``edit_loss_fn`` returns the usual statistics with ``nll`` replaced by L, so with ``cedit: 1``,
  ``iedit: 0``, ``cloc: 0`` (enforced by ``UniKETrainingHparams``) the trainer's total loss is L;
* ``state_dict()`` is the archive payload and ``load_state_dict()`` accepts it, so the trainer's
  save (``results_dir/models/UniKE/<model basename>``) is itself a UniKE archive and resuming works.

The base class is EasyEdit's ``EditableModel`` when EasyEdit is importable, else a plain
``nn.Module`` with the same constructor, so the class can be imported (and unit-tested) without it.
"""

from __future__ import annotations

import logging
import re
from typing import Any

import torch
from torch import nn

from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import Batch, Query, unwrap_model

from .archive import record_hash
from .offline import UniKEOffline, _row_hashes

log = logging.getLogger(__name__)

try:  # EasyEdit main's base class, when EasyEdit is on the path
    from easyeditor.trainer.algs.editable_model import EditableModel as _EditableBase  # type: ignore
    HAVE_EASYEDIT = True
except Exception:  # noqa: BLE001 - any import failure means "no EasyEdit here"
    HAVE_EASYEDIT = False

    class _EditableBase(nn.Module):  # type: ignore[no-redef]
        """Stand-in for EasyEdit's ``EditableModel`` constructor (stores model, config copy, constructor)."""

        def __init__(self, model: nn.Module, config: Any, model_constructor: Any) -> None:
            super().__init__()
            import copy

            self.model = model
            self.config = copy.deepcopy(config)
            self.model_constructor = model_constructor
            self.edit_loss_fn = None


def _target_stats(pred: torch.Tensor, targ: torch.Tensor, shift: bool) -> dict[str, torch.Tensor]:
    """acc / log_prob / prob / n_tokens over label positions (EasyEdit's multiclass statistics)."""
    pred = pred.float()
    if shift:
        pred, targ = pred[:, :-1], targ[:, 1:]
    targ = targ.to(pred.device)
    if targ.shape[1] != pred.shape[1]:  # unaligned targets (LAVIS batch labels): score the trailing positions
        n = min(targ.shape[1], pred.shape[1])
        pred, targ = pred[:, -n:], targ[:, -n:]
    mask = targ != -100
    safe = targ.masked_fill(~mask, 0)
    lp = pred.log_softmax(-1).gather(-1, safe.unsqueeze(-1)).squeeze(-1)
    n = mask.sum().clamp_min(1)
    acc = ((pred.argmax(-1) == safe) & mask).sum() / n
    log_prob = (lp * mask).sum() / n
    return {"acc": acc, "log_prob": log_prob, "prob": log_prob.exp(), "n_tokens": mask.sum(), "nll": -log_prob}


class _Frozen:
    """The "edited" model the trainer evaluates: the frozen base model (plus variant banking)."""

    def __init__(self, owner: "UniKETrainable", target_ids: list[list[int]] | None, inner_hash: set[str]) -> None:
        self.owner = owner
        self.target_ids = target_ids
        self.inner_hash = inner_hash

    def __call__(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        out = self.owner.forward(batch)
        if self.target_ids is not None and self.owner.training and self.owner.config.include_variants:
            self.owner.observe_variant(batch, self.target_ids, self.inner_hash)
        return out


class UniKETrainable(_EditableBase):
    """EasyEdit trainable algorithm ``UNIKE``: trains UniKE's encoders and builds its archive."""

    def __init__(self, model: nn.Module, config: Any, model_constructor: Any) -> None:
        super().__init__(model, config, model_constructor)
        base = unwrap_model(model)
        self.adapter = get_adapter(base, self.config)
        self.tok = self._load_tokenizer(base)
        self.off = UniKEOffline(base, self.tok, self.config, self.adapter, dataset="easyedit-trainer", split="train")
        self._orig_loss_fn = getattr(self, "edit_loss_fn", None)
        self._last_loss: torch.Tensor | None = None
        self.edit_loss_fn = self._edit_loss_fn
        for p in base.parameters():
            p.requires_grad_(False)
        base.eval()

    # -- helpers ---------------------------------------------------------------------------------
    def _load_tokenizer(self, base: nn.Module) -> Any:
        lm_tok = getattr(self.adapter, "lm_tokenizer", None)
        if lm_tok is not None:  # LAVIS wrappers carry their tokenizer
            return lm_tok(base, None)
        from mke_plugins.adapters.processors import load_processor
        from mke_plugins.hparams import resolve_special

        name = resolve_special(getattr(self.config, "name", "") or self.config.model_name)
        return load_processor(str(name))

    def _text_tok(self) -> Any:
        return getattr(self.tok, "tokenizer", self.tok)

    def _is_hf(self, batch: Any) -> bool:
        return "input_ids" in batch and torch.is_tensor(batch["input_ids"])

    def _tensors(self, batch: Any) -> dict[str, Any]:
        return {k: v for k, v in batch.items() if k != "labels" and torch.is_tensor(v)}

    def to_batch(self, batch: Any) -> Batch:
        """An EasyEdit trainer batch (HF ``BatchFeature`` or LAVIS sample dict) as an adapter :class:`Batch`."""
        base = self.model
        if self._is_hf(batch):
            inputs = self._tensors(batch)
            ids = inputs["input_ids"]
            image_mask = torch.zeros_like(ids, dtype=torch.bool)
            for tid in self.adapter.image_token_ids(base):
                image_mask |= ids == tid
            att = inputs.get("attention_mask", torch.ones_like(ids))
            return Batch(inputs=inputs, labels=batch["labels"], attention_mask=att, image_mask=image_mask)
        with torch.no_grad():
            out = base(batch)
        labels = out.labels
        lm_tok = self._text_tok()
        queries = []
        for i, text in enumerate(batch["text_input"]):
            target = lm_tok.decode([t for t in batch["labels"][i].tolist() if t >= 0], skip_special_tokens=True)
            prompt = text[: len(text) - len(target)] if target and text.endswith(target) else text
            image = batch["image"][i] if batch.get("image") is not None else None
            queries.append(Query(image, prompt, target.strip() or target))
        att = torch.ones_like(labels)
        img = torch.zeros_like(labels, dtype=torch.bool)
        return Batch(inputs={"samples": batch}, labels=labels, attention_mask=att, image_mask=img, queries=queries)

    def record_hashes(self, condition: Any, n: int, targets: list[list[int]] | None = None) -> list[str | None]:
        """(question, answer) hashes from the trainer's ``cond`` ("{pred} >> {alt} || {src}").

        Tokenizers without ``>>`` / ``||`` in their vocabulary drop the separators; then the
        answer is the decoded target ids and the question is what follows it in ``cond``
        (compared whitespace- and case-insensitively, as :func:`record_hash` does).
        """
        ids = condition.get("input_ids") if condition is not None and hasattr(condition, "get") else None
        if ids is None:
            return [None] * n
        tt = self._text_tok()
        out: list[str | None] = []
        for i, row in enumerate(ids):
            text = tt.decode(row.tolist(), skip_special_tokens=True)
            if "||" in text and ">>" in text:
                left, src = text.split("||", 1)
                out.append(record_hash(src.strip(), left.split(">>", 1)[1].strip()))
                continue
            alt = tt.decode(targets[i], skip_special_tokens=True) if targets and i < len(targets) else ""
            flat, key = re.sub(r"\s+", "", text).lower(), re.sub(r"\s+", "", alt).lower()
            at = flat.find(key) if key else -1
            out.append(record_hash(flat[at + len(key):], key) if at >= 0 and flat[at + len(key):] else None)
        return (out + [None] * n)[:n]

    @staticmethod
    def _targets(batch: Batch) -> list[list[int]]:
        return [row[row != -100].tolist() for row in batch.labels]

    # -- EditableModel interface -----------------------------------------------------------------
    def forward(self, batch: Any, *args: Any, **kwargs: Any) -> Any:
        self.model.eval()
        with torch.no_grad():
            if self._is_hf(batch):
                return self.model(**self._tensors(batch), use_cache=False)
            return self.model(batch)

    def outer_parameters(self) -> list[nn.Parameter]:
        return self.off.encoder_parameters()

    def train(self, mode: bool = True) -> "UniKETrainable":
        super().train(mode)
        self.model.eval()
        return self

    def edit(self, batch: Any, condition: Any = None, detach_history: bool = False, **kwargs: Any
             ) -> tuple[_Frozen, dict[str, float]]:
        self.model.eval()
        b = self.to_batch(batch)
        hashes = _row_hashes(b)
        targets = self._targets(b)
        states = self.off.observe(b, add_to_bank=self.training, hashes=hashes,
                                  record_hashes=self.record_hashes(condition, len(b), targets))
        with torch.set_grad_enabled(self.training):
            loss, parts = self.off.loss(states)
        self._last_loss = loss
        info: dict[str, float] = dict(parts)
        if len(states):
            info.update(self.off.evaluate(states))
        info["unike/bank_size"] = float(self.off.bank_size)
        return _Frozen(self, targets, set(hashes)), info

    def observe_variant(self, batch: Any, target_ids: list[list[int]], seen: set[str]) -> None:
        """Bank a rephrased-question / rephrased-image batch that carries the edit's target ids."""
        if not isinstance(batch, dict) and not hasattr(batch, "keys"):
            return
        try:
            b = self.to_batch(batch)
        except Exception:  # noqa: BLE001 - not a batch we can read: nothing to bank
            return
        if self._targets(b) != target_ids:
            return
        hashes = _row_hashes(b)
        if set(hashes) <= seen:
            return
        self.off.observe(b, add_to_bank=True, hashes=hashes)

    def _edit_loss_fn(self, config: Any, pred: torch.Tensor, targ: torch.Tensor, **kwargs: Any) -> dict[str, Any]:
        if self._orig_loss_fn is not None:
            try:
                out = dict(self._orig_loss_fn(config, pred, targ, **kwargs))
            except TypeError:  # easyeditor 0.0.1.dev0: no keyword arguments
                out = dict(self._orig_loss_fn(config, pred, targ))
        else:
            out = _target_stats(pred, targ, shift=getattr(self.adapter, "family", "") in ("blip2", "minigpt4"))
        if self._last_loss is None:
            raise RuntimeError("UniKETrainable.edit_loss_fn called before edit(): the loss is UniKE's L of the "
                               "last edit() call")
        out["nll"] = self._last_loss
        return out

    # -- archive ---------------------------------------------------------------------------------
    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:  # type: ignore[override]
        return self.off.payload()

    def load_state_dict(self, state_dict: Any, strict: bool = True, assign: bool = False) -> Any:  # type: ignore[override]
        self.off.load_payload(state_dict, "<trainer archive>")
        return None
