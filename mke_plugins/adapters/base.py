"""The family-agnostic face of a multimodal model.

Every method in this package talks to a model only through a :class:`VLMAdapter`: it never
names a module path and never branches on the model family. One subclass per family lives
beside this file; :func:`mke_plugins.adapters.get_adapter` picks it.

Conventions shared by every adapter (methods rely on them):

* A :class:`Batch` is teacher-forced: ``labels`` has the shape of the language model's
  sequence (for LAVIS-style models that sequence starts with the image query tokens) and is
  -100 everywhere except the target tokens, which sit at the end of each row (right-aligned),
  exactly as EasyEdit's evaluator builds them. ``logits[:, t]`` predicts ``labels[:, t + 1]``.
* Rows are left-padded; every mask is ``(B, T)`` and aligned with the language model sequence.
* ``Query.image is None`` means a text-only query: no image and no image placeholder.
* Hook points (:class:`HookPoint`) name a module and whether its *input* (first positional
  argument) or its *output* is meant; ``mke_plugins.core.hooks`` reads and edits them.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Sequence

import torch
from torch import nn


@dataclass(frozen=True)
class Query:
    """One teacher-forced query: a family-native image (or ``None``), a prompt and a target."""

    image: Any | None
    prompt: str
    target: str


@dataclass(frozen=True)
class HookPoint:
    """A place in the model: the input (first positional argument) or output of ``module``."""

    module: nn.Module
    where: Literal["input", "output"]


@dataclass
class LayerInfo:
    """One decoder layer of the language model, with the parts methods edit.

    ``value`` is the FFN's second projection (``down_proj`` / ``fc2``): ``value.weight`` is
    ``(d, d_ff)`` and column ``i`` is neuron ``i``'s value vector. ``keys`` are the first
    projections (``[gate_proj, up_proj]`` for gated FFNs, ``[fc1]`` otherwise). ``ffn_in`` is
    the FFN input (the post-attention-norm output), ``ffn_out`` the FFN output (before the
    residual add), ``value_in`` the value matrix's input (the activation ``a`` of the spec).
    """

    index: int
    name: str  # dotted module name of the layer inside the model
    layer: nn.Module
    mlp: nn.Module | None
    value: nn.Linear
    keys: list[nn.Linear]
    attn: nn.Module
    gated: bool
    act_fn: Callable[[torch.Tensor], torch.Tensor]
    ffn_in: HookPoint
    ffn_out: HookPoint
    value_in: HookPoint
    value_name: str = ""  # dotted parameter prefix of ``value`` (``...mlp.down_proj``)


@dataclass
class Batch:
    """Teacher-forced model inputs plus the position bookkeeping every method needs."""

    inputs: dict[str, Any]  # what the adapter's ``forward`` passes to the model
    labels: torch.Tensor  # (B, T) long, -100 except the right-aligned target ids
    attention_mask: torch.Tensor  # (B, T) long/bool, 0 on padding
    image_mask: torch.Tensor  # (B, T) bool, True on image tokens
    queries: list[Query] = field(default_factory=list)

    @property
    def target_mask(self) -> torch.Tensor:
        """(B, T) bool: positions holding target tokens."""
        return self.labels != -100

    @property
    def answer_mask(self) -> torch.Tensor:
        """(B, T) bool: positions whose logits predict a target token (``target_mask`` shifted left)."""
        m = torch.zeros_like(self.target_mask)
        m[:, :-1] = self.target_mask[:, 1:]
        return m

    @property
    def prompt_mask(self) -> torch.Tensor:
        """(B, T) bool: non-padding positions before the first target token."""
        tm = self.target_mask.long()
        before = tm.cumsum(dim=1) == 0
        return before & self.attention_mask.bool()

    def answer_positions(self) -> list[list[int]]:
        """Per row, the positions whose next-token logits predict the target tokens, in order."""
        return [row.nonzero().flatten().tolist() for row in self.answer_mask]

    def __len__(self) -> int:
        return int(self.labels.shape[0])


class VLMAdapter:
    """Everything model-specific about one family. Subclasses override what differs."""

    family: str = ""
    #: markers that identify the family inside ``hparams.model_name`` (EasyEdit's rules)
    markers: Sequence[str] = ()

    # -- detection ---------------------------------------------------------------------
    @classmethod
    def matches_name(cls, model_name: str) -> bool:
        raise NotImplementedError

    @classmethod
    def matches_model(cls, model: nn.Module) -> bool:
        raise NotImplementedError

    # -- inputs ------------------------------------------------------------------------
    def batch(self, model: nn.Module, tok: Any, queries: Sequence[Query], *,
              append_eos: bool = False, dtype: torch.dtype | None = None) -> Batch:
        """Teacher-forced inputs and labels, built exactly as EasyEdit's evaluator builds them.

        ``append_eos`` adds the family's end-of-answer token after the target (in labels too).
        Tensors go to the model's device; float tensors are cast to ``dtype`` (default: the
        model's dtype).
        """
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        """Logits ``(B, T, V)`` aligned with ``batch.labels``."""
        raise NotImplementedError

    def eos_token_id(self, tok: Any) -> int | None:
        """The end-of-answer token (tokenizer EOS or the chat template's end-of-turn)."""
        raise NotImplementedError

    def prompt_mask_from_inputs(self, tok: Any, inputs: dict[str, Any]) -> torch.Tensor:
        """(B, T) bool prompt positions of arbitrary model inputs (no labels needed)."""
        raise NotImplementedError

    def generate(self, model: nn.Module, tok: Any, query: Query, max_new_tokens: int = 8) -> str:
        """Greedy decoding from ``query``'s prompt (its target is ignored)."""
        raise NotImplementedError

    # -- structure ---------------------------------------------------------------------
    def layers(self, model: nn.Module) -> list[LayerInfo]:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def embed_output(self, model: nn.Module) -> HookPoint:
        """Where the joint text+image sequence enters the first decoder layer."""
        raise NotImplementedError
