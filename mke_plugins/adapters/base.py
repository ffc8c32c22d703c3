"""The family-agnostic face of a multimodal model.

Every method in this package talks to a model only through a :class:`VLMAdapter`: it never
names a module path and never branches on the model family. One subclass per family lives
beside this file; :func:`mke_plugins.adapters.get_adapter` picks it.

Conventions shared by every adapter (methods rely on them):

* A :class:`Batch` is teacher-forced: ``labels`` has the shape of the language model's
  sequence (for LAVIS-style models that sequence starts with the image query tokens) and is
  -100 everywhere except the target tokens, which sit at the end of each row (right-aligned),
  exactly as EasyEdit's evaluator builds them. ``logits[:, t]`` predicts ``labels[:, t + 1]``.
* HF rows are left-padded (each row is built alone, exactly as the evaluator builds it, then
  padded). LAVIS rows follow the wrapper, which pads on the right. Every mask is ``(B, T)`` and
  aligned with the language model sequence; use the masks, never assume where padding is.
* ``Query.image is None`` means a text-only query: no image and no image placeholder.
* Hook points (:class:`HookPoint`) name a module and whether its *input* (first positional
  argument) or its *output* is meant; ``mke_plugins.core.hooks`` reads and edits them.
  OPT (blip2) flattens the FFN to ``(B*T, d)``; ``LayerInfo.ffn_flat`` says so and the core
  hooks reshape to ``(B, T, d)`` when given the batch shape.
* ``model`` arguments may be a ``GatedModel`` (``mke_plugins.core.wrap``): structure accessors
  unwrap it (:func:`unwrap_model`), ``forward``/``generate`` call it as given, so gated edits
  are active exactly when the wrapper is called.
* Inside ``with adapter.encoder_cache(model):`` (every apply runs in one) ``forward`` reuses the
  vision tower's outputs for pictures it has already encoded (:mod:`.encoder_cache`).
* :meth:`VLMAdapter.answer_logits` gives the logits at the answer positions only (what a loss
  over the target tokens reads), without the full ``(B, T, V)`` tensor where the family allows.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Literal, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mke_hooks import HparamsError
from mke_plugins.adapters.encoder_cache import EncoderCache, encoder_cache


def unwrap_model(model: Any) -> nn.Module:
    """The base model behind any number of ``GatedModel``-style wrappers (``mke_wrapped = True``)."""
    while getattr(type(model), "mke_wrapped", False):
        model = model.model
    return model


def model_device(model: Any) -> torch.device:
    """Device where the model takes its inputs: that of its input embeddings (``get_input_embeddings``).

    On a model spread over several GPUs (``device_map="auto"``) the first parameter may sit in another
    tower; ``input_ids`` go to the embeddings first (accelerate's hooks move every other input to
    its module). Without input embeddings: the first parameter's device; CPU for a parameterless model.
    """
    base = unwrap_model(model)
    get = getattr(base, "get_input_embeddings", None)
    if callable(get):
        try:
            weight = getattr(get(), "weight", None)
        except (NotImplementedError, AttributeError):
            weight = None
        if isinstance(weight, torch.Tensor) and weight.device.type != "meta":
            return weight.device
    for p in base.parameters():
        return p.device
    return torch.device("cpu")


def model_dtype(model: Any) -> torch.dtype:
    """Dtype of the model's first floating parameter (float32 if none)."""
    for p in unwrap_model(model).parameters():
        if p.is_floating_point():
            return p.dtype
    return torch.float32


def resolve_layers(layers: Iterable[int], n_layers: int, *, key: str = "layers") -> list[int]:
    """Sorted absolute indices of the decoder ``layers`` an hparams field names (negative ones count from the top).

    ``key`` is the hparams field, named in the ``HparamsError`` an index out of range or a layer
    listed twice raises.
    """
    layers = list(layers)
    out = []
    for value in layers:
        i = int(value) + n_layers if int(value) < 0 else int(value)
        if not 0 <= i < n_layers:
            raise HparamsError(f"entry {value} is out of range for a language model with {n_layers} decoder layers.",
                               key=key, fix=f"use indices in [-{n_layers}, {n_layers - 1}] (e.g. [-1] for the last "
                                            f"layer).")
        out.append(i)
    if len(set(out)) != len(out):
        raise HparamsError(f"{layers} names the same layer twice.", key=key, fix="list each layer once.")
    return sorted(out)


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
    ``(d, d_ff)`` and column ``i`` is neuron ``i``'s value vector. ``keys`` are the first projections
    (``[gate_proj, up_proj]`` for gated FFNs, ``[fc1]`` otherwise). ``ffn_in`` is the FFN input
    (the post-attention-norm output), ``ffn_out`` the FFN output (before the residual add),
    ``value_in`` the value matrix's input (the activation ``a`` of the methods' neuron formulas).
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
    ffn_flat: bool = False  # FFN hook tensors are (B*T, .) instead of (B, T, .) (OPT)


@dataclass
class Batch:
    """Teacher-forced model inputs plus the position bookkeeping every method needs."""

    #: what the adapter's ``forward`` passes to the model. HF: the processor outputs, called as
    #: ``model(**inputs)``; LAVIS: ``{"samples": sample_dict_or_list}``, called as
    #: ``model(inputs["samples"])``. Always go through ``adapter.forward``.
    inputs: dict[str, Any]
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


@dataclass
class AnswerLogits:
    """The logits of a batch at its answer positions only, with the labels they predict.

    ``logits`` is ``(N, V)``, one row per True entry of ``mask`` (``batch.answer_mask``) in
    row-major order; ``labels`` is ``(N,)``. The reductions give exactly what the adapter's
    full-logits ``loss``/``token_accuracy``/``success`` give on the same batch.
    """

    logits: torch.Tensor
    labels: torch.Tensor
    mask: torch.Tensor

    def with_labels(self, labels: torch.Tensor) -> "AnswerLogits":
        """The same logits scored against other ``(B, T)`` labels with the same target positions."""
        if not torch.equal((labels[:, 1:] != -100).to(self.mask.device), self.mask[:, :-1]):
            raise ValueError("with_labels needs labels whose non -100 positions are the batch's target positions")
        return AnswerLogits(self.logits, labels[:, 1:][self.mask[:, :-1].to(labels.device)], self.mask)

    def _spread(self, values: torch.Tensor, fill: Any = 0) -> torch.Tensor:
        """(B, T-1) tensor with ``values`` (N,) at the shifted target positions, ``fill`` elsewhere."""
        m = self.mask[:, :-1]
        out = torch.full(m.shape, fill, dtype=values.dtype, device=values.device)
        return out.masked_scatter(m.to(values.device), values)

    def loss(self, reduction: Literal["mean", "row"] = "mean") -> torch.Tensor:
        """Cross-entropy on fp32 logits: ``mean`` over every target token, or ``row`` (B,) means."""
        ce = self._spread(F.cross_entropy(self.logits.float(), self.labels.to(self.logits.device), reduction="none"))
        mask = self.mask[:, :-1].to(ce.device).float()
        if reduction == "row":
            return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)

    def _hits(self) -> tuple[torch.Tensor, torch.Tensor]:
        hits = self.logits.argmax(-1) == self.labels.to(self.logits.device)
        mask = self.mask[:, :-1].to(hits.device)
        return self._spread(hits, False), mask

    def token_accuracy(self) -> torch.Tensor:
        """(B,) share of target tokens that are the argmax at their position."""
        hits, mask = self._hits()
        return hits.sum(1).float() / mask.sum(1).clamp_min(1).float()

    def success(self) -> torch.Tensor:
        """(B,) bool: every target token is the argmax (rows without targets: False)."""
        hits, mask = self._hits()
        return (hits == mask).all(1) & mask.any(1)


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

    def answer_rows_only(self, model: nn.Module) -> bool:
        """Whether ``answer_logits`` applies the LM head to the answer rows of the final norm's output
        only (transformers' ``logits_to_keep`` mask); ``False``: it gathers them from the full logits."""
        return False

    def answer_logits(self, model: nn.Module, batch: Batch) -> AnswerLogits:
        """Logits at ``batch.answer_mask`` only, with their labels (default: gathered from ``forward``)."""
        return self.gather_answers(self.forward(model, batch), batch)

    @staticmethod
    def gather_answers(logits: torch.Tensor, batch: Batch) -> AnswerLogits:
        """``AnswerLogits`` from ``logits`` at every position ``(B, T, V)`` (gathered at the answer
        positions) or already at the answer positions only ``(N, V)``."""
        mask = batch.answer_mask
        labels = batch.labels[:, 1:][mask[:, :-1]]
        if logits.dim() == 3:
            logits = logits[mask.to(logits.device)]
        return AnswerLogits(logits=logits, labels=labels, mask=mask)

    # -- encoder cache -------------------------------------------------------------------
    def encoder_towers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
        """The modules (and loose parameters) the picture's encoding depends on; none: no cache."""
        return [], []

    def encoder_patches(self, model: nn.Module, cache: EncoderCache) -> list[ContextManager[Any]]:
        """Context managers the cache enters for families whose forward takes no precomputed features."""
        return []

    def encoder_cache(self, model: nn.Module) -> ContextManager[EncoderCache | None]:
        """Within the block, each picture is encoded once and the result reused (see ``encoder_cache``).

        Yields the :class:`EncoderCache` (its ``stats`` count what was encoded and reused), or
        ``None`` for a family without a vision tower to cache.
        """
        towers, params = self.encoder_towers(model)
        if not towers:
            return contextlib.nullcontext(None)
        cache = EncoderCache(unwrap_model(model), towers, params)
        return encoder_cache(cache, self.encoder_patches(model, cache))

    def eos_token_id(self, tok: Any) -> int | None:
        """The end-of-answer token (tokenizer EOS or the chat template's end-of-turn)."""
        raise NotImplementedError

    def prompt_mask_from_inputs(self, tok: Any, inputs: dict[str, Any], model: nn.Module | None = None
                                ) -> torch.Tensor:
        """(B, T) bool prompt positions of arbitrary model inputs (no labels needed).

        HF chat families: non-padding positions up to the end of the last
        ``<|im_start|>assistant\\n`` header (all non-padding positions if there is none). LAVIS:
        the image prefix plus ``prompts_len`` text tokens; needs ``model=``. ``inputs`` may be a
        ``Batch.inputs`` dict.
        """
        raise NotImplementedError

    def generate(self, model: nn.Module, tok: Any, query: Query, max_new_tokens: int = 8) -> str:
        """Greedy decoding from ``query``'s prompt (its target is ignored)."""
        raise NotImplementedError

    def validate_image(self, image: Any, field: str = "image") -> Any:
        """Check a request image's type for this family; return it in the form ``batch`` uses.

        Raises ``mke_hooks.errors.RequestError`` (a ``ValueError``) naming ``field`` and the
        expected type.
        """
        raise NotImplementedError

    # -- structure ---------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        """The decoder stack (holds ``layers``); what ``final_norm`` and ``layers`` live in."""
        raise NotImplementedError

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        raise NotImplementedError

    def lm_head(self, model: nn.Module) -> nn.Linear:
        raise NotImplementedError

    def final_norm(self, model: nn.Module) -> nn.Module:
        raise NotImplementedError

    def embed_output(self, model: nn.Module) -> HookPoint:
        """Where the joint text+image sequence enters the first decoder layer."""
        return HookPoint(self.layers(model)[0].layer, "input")

    # -- shared conveniences -------------------------------------------------------------
    def image_token_mask(self, batch: Batch) -> torch.Tensor:
        """(B, T) bool: positions holding image tokens (LAVIS: the image query tokens)."""
        return batch.image_mask

    def loss(self, model: nn.Module, batch: Batch, logits: torch.Tensor | None = None,
             reduction: Literal["mean", "row"] = "mean") -> torch.Tensor:
        """Cross-entropy over the target tokens on fp32 logits.

        ``mean``: one scalar, the mean over every target token of the batch; ``row``: ``(B,)``,
        each row's mean. ``logits`` skips the forward when already computed.
        """
        if logits is None:
            logits = self.forward(model, batch)
        lg = logits[:, :-1].float()
        tg = batch.labels[:, 1:].to(lg.device)
        ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100,
                             reduction="none").view(tg.shape)
        mask = (tg != -100).float()
        if reduction == "row":
            return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        return (ce * mask).sum() / mask.sum().clamp_min(1.0)

    @staticmethod
    def _shifted_hits(logits: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        pred = logits[:, :-1].argmax(-1)
        targ = batch.labels[:, 1:].to(pred.device)
        mask = targ != -100
        return (pred == targ) & mask, mask

    def token_accuracy(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B,) EasyEdit's accuracy: share of target positions whose shifted argmax equals the label."""
        hits, mask = self._shifted_hits(logits, batch)
        return hits.sum(1).float() / mask.sum(1).clamp_min(1).float()

    def success(self, logits: torch.Tensor, batch: Batch) -> torch.Tensor:
        """(B,) bool: every target token is the argmax at its position (rows without targets: False)."""
        hits, mask = self._shifted_hits(logits, batch)
        return (hits == mask).all(1) & mask.any(1)
