"""A STAND-IN for EasyEdit's ``MultimodalTrainer`` loop, for CI without EasyEdit.

This is not EasyEdit. It reproduces, from EasyEdit main (commit 14cea82,
``easyeditor/trainer/MultimodalTrainer.py`` on ``BaseTrainer.py``; see ``hooks/EASYEDIT-NOTES.md``,
"MultimodalTrainer and EditableModel"), only what a
trainable ``EditableModel`` sees, so a method's trainer class can be driven the same way in CI:

* construction: ``alg_class(model, config, lambda: deepcopy(model))``, moved to
  ``config.device`` (with ``config.model_parallel`` left where it is, and ``config.device`` set to
  the model's, as ``BaseTrainer`` does); ``getattr(torch.optim, config.opt)`` over ``outer_parameters()`` with
  ``config.lr``; data loaders over ``train_set.collate_fn`` (training shuffled);
* ``edit_step``: ``model(batch["loc"])`` and ``model(batch["loc_image"])`` without gradient
  (the dict passed positionally), then ``model.edit(batch["edit_inner"], batch["cond"])``, then
  the edited model on ``edit_outer``, ``edit_inner``, ``edit_outer_image``, ``loc`` and
  ``loc_image``; ``l_edit``/``l_image_edit`` from ``model.edit_loss_fn(config, logits, labels,
  multimodal=True)["nll"]`` (labels from the output's ``.labels`` when it has them, else the
  batch's), ``l_loc``/``l_image_loc`` the masked KL of base vs. edited logits; the loss
  ``cedit*l_edit + cloc*(l_loc + l_image_loc) + iedit*l_image_edit`` through
  ``torch.autograd.grad`` over ``outer_parameters()`` (EasyEdit's ``safe_backward``: skipped on
  NaN/inf), gradient-norm clip ``grad_clip``, optimiser step every ``accumulate_bs`` steps;
* ``run()``: ``config.max_epochs`` epochs over the training loader (EasyEdit counts its
  iteration cap in samples; the stand-in simply runs whole epochs), validation averaged into
  ``*_val`` keys, ``results.json`` written to ``results_dir`` when ``final_eval`` is true.

The real trainer is exercised by ``tests/host`` when ``EASYEDIT_SRC`` is set.
"""

from __future__ import annotations

import copy
import json
import time
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import torch
from torch.utils.data import DataLoader


def kl_loc_loss(pre: torch.Tensor, post: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over masked positions of KL(softmax(pre) || softmax(post)), in float32."""
    pre, post = pre.float(), post.float()
    kl = (pre.softmax(-1) * (pre.log_softmax(-1) - post.log_softmax(-1))).sum(-1)
    m = mask.to(kl.device).float().view(kl.shape)
    return (kl * m).sum() / m.sum().clamp_min(1.0)


def _logits_labels(out: Any, part: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if torch.is_tensor(out):
        return out, part.get("labels") if isinstance(part, dict) else None
    labels = getattr(out, "labels", None)
    if labels is None and isinstance(part, dict):
        labels = part.get("labels")
    return out.logits, labels


def _mask(out: Any, part: Any, logits: torch.Tensor) -> torch.Tensor:
    m = getattr(out, "attention_mask", None)
    if m is None and isinstance(part, dict):
        m = part.get("attention_mask")
    if m is None or tuple(m.shape) != tuple(logits.shape[:2]):
        m = torch.ones(logits.shape[:2], device=logits.device)
    return m


class StandInMultimodalTrainer:
    """Drives an ``EditableModel`` class like EasyEdit's ``MultimodalTrainer`` (see the module docstring)."""

    def __init__(self, config: Any, train_set: Any, val_set: Any, *, model: torch.nn.Module,
                 alg_class: type, seed: int | None = None, progress: Callable[[str], None] | None = None) -> None:
        self.config = config
        self.model = alg_class(model, config, lambda: copy.deepcopy(model))
        if getattr(config, "model_parallel", False):  # EasyEdit's way: a spread model stays where it is
            config.device = self.model.model.device
        else:
            self.model.to(config.device if not isinstance(config.device, int) else f"cuda:{config.device}")
        self.original_model = self.model.model
        self.train_set, self.val_set = train_set, val_set
        gen = torch.Generator().manual_seed(int(seed if seed is not None else getattr(config, "seed", 0)))
        self.train_loader = DataLoader(train_set, batch_size=config.batch_size, shuffle=True,
                                       collate_fn=train_set.collate_fn, generator=gen)
        self.val_loader = DataLoader(val_set, batch_size=config.val_batch_size, shuffle=False,
                                     collate_fn=val_set.collate_fn)
        self.opt = getattr(torch.optim, config.opt)(self.model.outer_parameters(), lr=config.lr)
        self.global_iter = 0
        self.progress = progress

    # -- EasyEdit's edit_step --------------------------------------------------------------------
    def edit_step(self, batch: dict[str, Any], training: bool) -> tuple[torch.Tensor, Any, Any, Any, dict]:
        self.model.train(training)
        self.original_model.train(training)
        with torch.no_grad():
            base_logits = _logits_labels(self.model(batch["loc"]), batch["loc"])[0]
            base_image_logits = _logits_labels(self.model(batch["loc_image"]), batch["loc_image"])[0]
        start = time.time()
        edited, model_info = self.model.edit(batch["edit_inner"], batch["cond"])
        edit_time = time.time() - start
        fn = self.model.edit_loss_fn
        with torch.set_grad_enabled(training):
            post_out = edited(batch["edit_outer"])
            post_logits, post_labels = _logits_labels(post_out, batch["edit_outer"])
            inner_logits, inner_labels = _logits_labels(edited(batch["edit_inner"]), batch["edit_inner"])
            img_logits, img_labels = _logits_labels(edited(batch["edit_outer_image"]), batch["edit_outer_image"])
            l_edit = fn(self.config, post_logits, post_labels, multimodal=True)["nll"]
            l_image_edit = fn(self.config, img_logits, img_labels, multimodal=True)["nll"]
            with torch.no_grad():
                post_d = fn(self.config, post_logits, post_labels, multimodal=True)
                inner_d = fn(self.config, inner_logits, inner_labels, multimodal=True)
                img_d = fn(self.config, img_logits, img_labels, multimodal=True)
            loc_out = edited(batch["loc"])
            loc_logits = _logits_labels(loc_out, batch["loc"])[0]
            img_loc_out = edited(batch["loc_image"])
            img_loc_logits = _logits_labels(img_loc_out, batch["loc_image"])[0]
            l_loc = kl_loc_loss(base_logits.detach(), loc_logits, _mask(loc_out, batch["loc"], loc_logits))
            l_image_loc = kl_loc_loss(base_image_logits.detach(), img_loc_logits,
                                      _mask(img_loc_out, batch["loc_image"], img_loc_logits))
        c = self.config
        l_total = c.cedit * l_edit + c.cloc * (l_loc + l_image_loc) + c.iedit * l_image_edit
        if training:
            params = list(self.model.outer_parameters())
            grads = torch.autograd.grad(l_total, params, allow_unused=True)
            if all(g is None or torch.isfinite(g).all() for g in grads):
                for p, g in zip(params, grads, strict=True):
                    if g is not None:
                        p.grad = g / c.accumulate_bs if p.grad is None else p.grad + g / c.accumulate_bs
        top1 = lambda x: x.argmax(-1)  # noqa: E731
        info = {
            "loss/edit": l_edit.item(), "loss/image_edit": l_image_edit.item(), "loss/loc": l_loc.item(),
            "edit/acc": float(post_d["acc"]), "inner/acc": float(inner_d["acc"]),
            "image_rephrase/acc": float(img_d["acc"]), "time/edit": edit_time,
            "loc/acc": float((top1(loc_logits) == top1(base_logits)).float().mean()),
            "image_loc/acc": float((img_loc_logits.topk(10, -1).indices == base_image_logits.topk(10, -1).indices)
                                   .float().mean()),
            "loss/total_edit": l_total.item(),
        }
        info.update({k: float(v) for k, v in model_info.items()})
        return l_total, l_edit, l_loc, torch.tensor(0.0), info

    def train_step(self, batch: dict[str, Any]) -> dict[str, float]:
        _, _, _, _, info = self.edit_step(batch, training=True)
        if self.global_iter > 0 and self.global_iter % self.config.accumulate_bs == 0:
            grad = torch.nn.utils.clip_grad_norm_(list(self.model.outer_parameters()), self.config.grad_clip)
            info["grad"] = float(grad)
            self.opt.step()
            self.opt.zero_grad()
        return info

    def validate(self, steps: int | None = None) -> dict[str, float]:
        sums: dict[str, list[float]] = defaultdict(list)
        for i, batch in enumerate(self.val_loader):
            if steps is not None and i >= steps:
                break
            _, _, _, _, info = self.edit_step(batch, training=False)
            for k, v in info.items():
                sums[f"{k}_val"].append(v)
        return {k: sum(v) / len(v) for k, v in sums.items()}

    def run(self) -> dict[str, float]:
        averaged: dict[str, list[float]] = defaultdict(list)
        for _ in range(int(self.config.max_epochs or 1)):
            for batch in self.train_loader:
                self.global_iter += 1
                info = self.train_step(batch)
                for k, v in info.items():
                    averaged[k].append(v)
                if self.progress is not None:
                    self.progress(f"step {self.global_iter} loss {info['loss/total_edit']:.4f}")
        stats = {k: sum(v) / len(v) for k, v in averaged.items()}
        if getattr(self.config, "final_eval", False):
            val = self.validate()
            out = Path(getattr(self.config, "results_dir", ".") or ".")
            out.mkdir(parents=True, exist_ok=True)
            (out / "results.json").write_text(json.dumps({"results": val}))
            stats.update(val)
        return stats
