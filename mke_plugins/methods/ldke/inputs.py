"""A family-agnostic view of the inputs a routed model is called with.

LDKE routes at ``forward`` time, when all it has are the model's inputs: keyword tensors
(``model(**inputs)``, HF chat families) or a sample dict / list of sample dicts
(``model(samples)``, EasyEdit's LAVIS wrappers). :func:`view_of` turns either into an
:class:`InputsView`: how to call the model, which positions are the prompt and which the image,
the prompt tokens of each row (for the exact-match guard) and the labels when the caller gave
sequence-aligned ones.

CONSOLIDATION NOTE (for the adapters owner): two things here belong in ``VLMAdapter`` and should
move there: the image mask of raw inputs (``image_mask_from_inputs``; HF: the image/video
placeholder ids, LAVIS: the image-query prefix) and the prompt tokens of raw inputs. They are
written against adapter capabilities (``image_token_ids`` / ``prefix_sizes`` /
``lm_tokenizer``), never against a family name.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

from mke_plugins.adapters.base import VLMAdapter, model_device, unwrap_model


@dataclass
class InputsView:
    """What LDKE needs to know about one call's inputs (all masks ``(B, T)``, model sequence)."""

    call: Callable[[nn.Module], Any]  # run a model on these inputs (the given model, no routing)
    prompt_mask: torch.Tensor  # bool: non-padding positions before the answer
    image_mask: torch.Tensor  # bool: image positions
    prompt_tokens: list[tuple[int, ...]]  # per row: token ids of the prompt text (exact-match guard)
    labels: torch.Tensor | None = None  # (B, T) sequence-aligned labels when the caller gave them
    valid_mask: torch.Tensor | None = None  # (B, T) bool non-padding positions (None: every position)
    batch_size: int = 0

    def __post_init__(self) -> None:
        self.batch_size = int(self.prompt_mask.shape[0])


def is_samples_call(args: tuple, kwargs: dict) -> bool:
    """``model(samples)`` (LAVIS wrappers) rather than ``model(**tensors)``."""
    return bool(args) and isinstance(args[0], (dict, list)) and "input_ids" not in kwargs


def _hf_image_mask(adapter: VLMAdapter, model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    mask = torch.zeros_like(ids, dtype=torch.bool)
    for tid in adapter.image_token_ids(model):  # type: ignore[attr-defined]
        mask |= ids == tid
    return mask


def _lavis_rows(samples: Any) -> list[dict[str, Any]]:
    return [samples] if isinstance(samples, dict) else list(samples)


def _lavis_image_mask(adapter: VLMAdapter, model: nn.Module, samples: Any, T: int) -> torch.Tensor:
    rows = []
    for s in _lavis_rows(samples):
        img = s.get("image")
        n = 1 if img is None or img.dim() == 3 else int(img.shape[0])
        before, nq, _ = adapter.prefix_sizes(model, img is not None)  # type: ignore[attr-defined]
        for _ in range(n):
            rows.append([False] * before + [True] * nq)
    return torch.tensor([r + [False] * (T - len(r)) for r in rows], dtype=torch.bool, device=model_device(model))


def _lavis_prompt_tokens(adapter: VLMAdapter, model: nn.Module, tok: Any, samples: Any) -> list[tuple[int, ...]]:
    lm_tok = adapter.lm_tokenizer(model, tok)  # type: ignore[attr-defined]
    out = []
    for s in _lavis_rows(samples):
        texts = s["text_input"]
        lens = s["prompts_len"]
        img = s.get("image")
        for i, text in enumerate(texts):
            ids = lm_tok(text, add_special_tokens=False)["input_ids"][: int(lens[i])]
            out.append((int(img is not None), *ids))
    return out


def _aligned_labels(labels: Any, ids: torch.Tensor) -> torch.Tensor | None:
    if torch.is_tensor(labels) and labels.shape == ids.shape:
        return labels
    return None


def prompt_mask_from_labels(labels: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Non-padding positions before the first label (the adapter's ``Batch.prompt_mask`` rule)."""
    before = (labels != -100).long().cumsum(dim=1) == 0
    return before & attention_mask.bool()


def view_of(adapter: VLMAdapter, model: nn.Module, tok: Any, args: tuple, kwargs: dict) -> InputsView:
    """The :class:`InputsView` of a call ``model(*args, **kwargs)``."""
    base = unwrap_model(model)
    if is_samples_call(args, kwargs):
        samples = args[0]
        pmask = adapter.prompt_mask_from_inputs(tok, {"samples": samples}, model=base)
        extra_args, extra_kwargs = args[1:], dict(kwargs)

        def call(m: nn.Module) -> Any:
            return m(samples, *extra_args, **extra_kwargs)

        return InputsView(call, pmask, _lavis_image_mask(adapter, base, samples, pmask.shape[1]),
                          _lavis_prompt_tokens(adapter, base, tok, samples))
    kw = dict(kwargs)
    if args and torch.is_tensor(args[0]) and "input_ids" not in kw:
        kw["input_ids"] = args[0]
        args = args[1:]
    ids = kw["input_ids"]
    att = kw.get("attention_mask")
    att = torch.ones_like(ids) if att is None else att
    labels = _aligned_labels(kw.get("labels"), ids)
    if labels is not None:
        pmask = prompt_mask_from_labels(labels, att)
    else:
        pmask = adapter.prompt_mask_from_inputs(tok, {"input_ids": ids, "attention_mask": att}, model=base)
    pmask = pmask.to(ids.device)
    prompt_tokens = [tuple(int(t) for t in ids[b][pmask[b]].tolist()) for b in range(ids.shape[0])]
    rest, call_kw = args, without_labels(kw)

    def call(m: nn.Module) -> Any:
        return m(*rest, **call_kw)

    return InputsView(call, pmask, _hf_image_mask(adapter, base, ids), prompt_tokens, labels,
                      att.bool().to(ids.device))


def host_batch_call(adapter: VLMAdapter, model: nn.Module, tok: Any, batch: Any) -> InputsView:
    """The view of an EasyEdit trainer batch part (HF dict with ``labels``, or LAVIS samples)."""
    if isinstance(batch, (list, tuple)) or (isinstance(batch, Mapping) and "text_input" in batch):
        return view_of(adapter, model, tok, (dict(batch) if isinstance(batch, Mapping) else batch,), {})
    kwargs = {k: v for k, v in dict(batch).items() if torch.is_tensor(v)}
    return view_of(adapter, model, tok, (), kwargs)


def without_labels(kwargs: dict) -> dict:
    """HF call kwargs minus ``labels`` (so the model does not compute its own loss)."""
    return {k: v for k, v in kwargs.items() if k != "labels"}
