"""Adapters for HF chat-template VLMs: Qwen2-VL / Qwen2.5-VL, Qwen3-VL, LLaVA-OneVision.

Inputs are built the way EasyEdit main's ``prepare_multimodal_hf_edit`` builds them, one row at a
time: the processor's chat template with one ``{"type": "image"}`` item per image (none for a
text-only query), Qwen's vision tokens prepended when the template leaves them out, the target
appended with no separator, ``processor(images=..., text=[chat + target])``, float tensors cast
to the model dtype, and labels -100 except the target tokenised alone
(``tokenizer(target, add_special_tokens=False)``), right-aligned. Rows are then left-padded and
concatenated, so a batch of one is token-for-token EasyEdit's.

Inside an encoder cache (``adapter.encoder_cache(model)``) ``forward`` encodes each distinct
picture once, alone, through the model's own ``get_image_features`` and hands the stored
outputs to the model as ``mm_encoder_outputs`` (transformers' precomputed-features input);
the Qwen families also reuse the M-RoPE position ids (``get_rope_index``) of a batch they have
seen. :meth:`HFChatAdapter.answer_logits` asks the model for logits at the answer positions
only (``logits_to_keep`` as a boolean mask). Both need a transformers release that has them
(``mm_encoder_outputs``, boolean ``logits_to_keep``); on an older one, such as the release
EasyEdit pins, the passes run as before (tower every pass, full logits gathered), same values.
"""

from __future__ import annotations

import functools
import inspect
import sys
from typing import Any, Sequence

import torch
from PIL import Image
from torch import nn

from mke_hooks.errors import RequestError
from mke_plugins.adapters.base import (
    AnswerLogits,
    Batch,
    HookPoint,
    LayerInfo,
    Query,
    VLMAdapter,
    model_device,
    model_dtype,
    unwrap_model,
)
from mke_plugins.adapters.encoder_cache import EncoderCache, active_cache

#: keys whose tensors are ``(1, T)`` per row and get left-padded (value used for padding)
_SEQ_PAD = {"attention_mask": 0, "mm_token_type_ids": 0, "token_type_ids": 0}
ASSISTANT_HEADER = "<|im_start|>assistant\n"


def _tokenizer_of(tok: Any):
    inner = getattr(tok, "tokenizer", None)
    if inner is None or not hasattr(tok, "apply_chat_template") or not hasattr(tok, "image_processor"):
        raise TypeError(f"HF multimodal families need the model's processor (AutoProcessor), got "
                        f"{type(tok).__name__}; pass the processor EasyEdit hands to apply() as `tok`")
    return inner


@functools.cache
def _takes_mask_logits_to_keep(cls: type) -> bool:
    """The model class slices its hidden states with a boolean ``logits_to_keep`` mask (transformers'
    ``slice_logits_to_keep``; older releases take only an int or index tensor)."""
    return getattr(sys.modules.get(cls.__module__), "slice_logits_to_keep", None) is not None


@functools.cache
def _takes_encoder_outputs(cls: type) -> bool:
    """The inner model's forward accepts precomputed ``mm_encoder_outputs`` (newer transformers)."""
    return "mm_encoder_outputs" in inspect.signature(cls.forward).parameters


class HFChatAdapter(VLMAdapter):
    """Shared logic of the chat-template families; subclasses set detection and image rules."""

    model_types: Sequence[str] = ()
    class_names: Sequence[str] = ()
    prepend_vision_tokens = False  # Qwen: add <|vision_start|><|image_pad|><|vision_end|> if missing

    # -- detection ---------------------------------------------------------------------
    @classmethod
    def matches_name(cls, model_name: str) -> bool:
        name = str(model_name).lower()
        return any(m in name for m in cls.markers)

    @classmethod
    def matches_model(cls, model: nn.Module) -> bool:
        base = unwrap_model(model)
        mt = getattr(getattr(base, "config", None), "model_type", None)
        return mt in cls.model_types or type(base).__name__ in cls.class_names

    # -- images ------------------------------------------------------------------------
    def images_for_row(self, image: Any, field: str = "image") -> list[Image.Image]:
        """The row's images as a list of PIL images (validated)."""
        raise NotImplementedError

    def validate_image(self, image: Any, field: str = "image") -> Any:
        return self.images_for_row(image, field)

    # -- inputs ------------------------------------------------------------------------
    def chat_prompt(self, tok: Any, prompt: str, n_images: int) -> str:
        """The chat text before the target, as EasyEdit's evaluator renders it."""
        content: list[dict[str, Any]] = [{"type": "image"}] * n_images + [{"type": "text", "text": prompt}]
        chat = tok.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True,
                                       tokenize=False)
        if n_images and self.prepend_vision_tokens and "|vision_start|" not in chat:
            chat = "<|vision_start|><|image_pad|><|vision_end|>" * n_images + chat
        return chat

    def processor_images(self, images: list[Image.Image]) -> Any:
        """The ``images=`` argument of the processor for one row (EasyEdit's ``images_list``)."""
        return [images[0]] if len(images) == 1 else [images]

    def encode_row(self, tok: Any, query: Query, with_target: bool = True) -> dict[str, torch.Tensor]:
        """Processor output for one query, exactly as the evaluator builds it (on CPU, uncast)."""
        if not isinstance(query.prompt, str):
            raise RequestError(f"prompt must be a string, got {type(query.prompt).__name__}", field="prompt")
        text_tail = query.target if with_target else ""
        if query.image is None:
            chat = tok.apply_chat_template([{"role": "user", "content": [{"type": "text", "text": query.prompt}]}],
                                           add_generation_prompt=True, tokenize=False)
            enc = tok(text=[chat + "" + text_tail], return_tensors="pt", padding=True)
        else:
            images = self.images_for_row(query.image)
            chat = self.chat_prompt(tok, query.prompt, len(images))
            enc = tok(images=self.processor_images(images), text=[chat + text_tail], return_tensors="pt",
                      padding=True)
        return dict(enc)

    def target_ids(self, tok: Any, target: str) -> list[int]:
        ids = _tokenizer_of(tok)(target, add_special_tokens=False)["input_ids"]
        if not ids:
            raise RequestError(f"target {target!r} tokenises to nothing", field="target")
        return list(ids)

    def image_token_ids(self, model: nn.Module) -> list[int]:
        cfg = unwrap_model(model).config
        ids = [getattr(cfg, k, None) for k in ("image_token_id", "video_token_id", "image_token_index",
                                              "video_token_index")]
        return [int(i) for i in ids if i is not None]

    def batch(self, model: nn.Module, tok: Any, queries: Sequence[Query], *, append_eos: bool = False,
              dtype: torch.dtype | None = None) -> Batch:
        queries = list(queries)
        if not queries:
            raise ValueError("batch() needs at least one Query")
        tokenizer = _tokenizer_of(tok)
        eos = self.eos_token_id(tok) if append_eos else None
        if append_eos and eos is None:
            raise ValueError(f"{self.family}: append_eos=True but the processor has no end-of-answer token")
        rows, labels = [], []
        for q in queries:
            enc = self.encode_row(tok, q)
            tgt = self.target_ids(tok, q.target)
            if eos is not None:
                enc = self._append_token(enc, eos)
                tgt = tgt + [eos]
            T = enc["input_ids"].shape[1]
            tgt = tgt[-T:]
            lab = torch.full((1, T), -100, dtype=torch.long)
            lab[0, T - len(tgt):] = torch.tensor(tgt, dtype=torch.long)
            rows.append(enc)
            labels.append(lab)
        pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
        inputs, lab = self._collate(rows, labels, int(pad_id))
        device = model_device(model)
        dtype = dtype or model_dtype(model)
        inputs = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
                  for k, v in inputs.items()}
        lab = lab.to(device)
        ids = inputs["input_ids"]
        image_mask = torch.zeros_like(ids, dtype=torch.bool)
        for tid in self.image_token_ids(model):
            image_mask |= ids == tid
        return Batch(inputs=inputs, labels=lab, attention_mask=inputs["attention_mask"], image_mask=image_mask,
                     queries=queries)

    @staticmethod
    def _append_token(enc: dict[str, torch.Tensor], token_id: int) -> dict[str, torch.Tensor]:
        T = enc["input_ids"].shape[1]
        out = dict(enc)
        for k, v in enc.items():
            if not (torch.is_tensor(v) and v.dim() == 2 and v.shape == (1, T)):
                continue
            fill = token_id if k == "input_ids" else (1 if k == "attention_mask" else 0)
            out[k] = torch.cat([v, torch.full((1, 1), fill, dtype=v.dtype)], dim=1)
        return out

    @staticmethod
    def _collate(rows: list[dict[str, torch.Tensor]], labels: list[torch.Tensor],
                 pad_id: int) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        lengths = [r["input_ids"].shape[1] for r in rows]
        T = max(lengths)
        seq_keys = {k for r in rows for k, v in r.items()
                    if torch.is_tensor(v) and v.dim() == 2 and v.shape == r["input_ids"].shape}
        out: dict[str, torch.Tensor] = {}
        for k in sorted(seq_keys):
            fill = pad_id if k == "input_ids" else _SEQ_PAD.get(k, 0)
            padded = []
            for r, n in zip(rows, lengths, strict=True):
                ref = rows[0]["input_ids"] if k not in r else r[k]
                v = r.get(k, torch.zeros((1, n), dtype=ref.dtype))
                pad = torch.full((1, T - n), fill, dtype=v.dtype)
                padded.append(torch.cat([pad, v], dim=1))
            out[k] = torch.cat(padded, dim=0)
        other_keys = [k for r in rows for k in r if k not in seq_keys and torch.is_tensor(r[k])]
        for k in dict.fromkeys(other_keys):
            parts = [r[k] for r in rows if k in r]
            if parts[0].dim() >= 2 and any(p.shape[1:] != parts[0].shape[1:] for p in parts):
                # LLaVA-OV pixel_values (n, patches, 3, H, W): pad the patch dim as its processor does
                width = max(p.shape[1] for p in parts)
                parts = [torch.cat([p, p.new_zeros((p.shape[0], width - p.shape[1], *p.shape[2:]))], dim=1)
                         if p.shape[1] < width else p for p in parts]
            out[k] = torch.cat(parts, dim=0)
        lab = torch.cat([torch.cat([torch.full((1, T - n), -100, dtype=torch.long), label], dim=1)
                         for label, n in zip(labels, lengths, strict=False)], dim=0)
        return out, lab

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        return model(**self.model_inputs(model, batch.inputs), use_cache=False).logits

    def answer_rows_only(self, model: nn.Module) -> bool:
        return _takes_mask_logits_to_keep(type(unwrap_model(model)))

    def answer_logits(self, model: nn.Module, batch: Batch) -> AnswerLogits:
        if not self.answer_rows_only(model):  # transformers before boolean logits_to_keep
            return super().answer_logits(model, batch)
        mask = batch.answer_mask
        logits = model(**self.model_inputs(model, batch.inputs), use_cache=False, logits_to_keep=mask).logits
        return self.gather_answers(logits, batch)

    # -- encoder cache -------------------------------------------------------------------
    def encoder_towers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
        inner = getattr(unwrap_model(model), "model", None)
        if inner is None or not _takes_encoder_outputs(type(inner)):  # older transformers: no cache
            return [], []
        towers = [m for m in (getattr(inner, n, None) for n in ("visual", "vision_tower", "multi_modal_projector"))
                  if isinstance(m, nn.Module)]
        newline = getattr(inner, "image_newline", None)
        return towers, [newline] if isinstance(newline, nn.Parameter) else []

    def model_inputs(self, model: nn.Module, inputs: dict[str, Any]) -> dict[str, Any]:
        """``inputs`` for ``model(**...)``: with an active encoder cache the picture's stored encoder
        outputs replace ``pixel_values`` (and stored position ids are added); otherwise unchanged."""
        pixels = inputs.get("pixel_values")
        if pixels is None:
            return inputs
        cache = active_cache(unwrap_model(model))
        if cache is None or not cache.usable(pixels):
            return inputs
        inner = unwrap_model(model).model
        features = self.cached_image_features(inner, cache, inputs)
        if features is None:
            return inputs
        out = {k: v for k, v in inputs.items() if k != "pixel_values"}
        out["mm_encoder_outputs"] = {"image": features}
        positions = self.cached_positions(inner, cache, inputs)
        if positions is not None:
            out["position_ids"] = positions
        return out

    def cached_image_features(self, inner: nn.Module, cache: EncoderCache, inputs: dict[str, Any]) -> Any:
        """The ``mm_encoder_outputs["image"]`` for ``inputs`` from ``cache`` (None: run the tower)."""
        return None

    def cached_positions(self, inner: nn.Module, cache: EncoderCache, inputs: dict[str, Any]
                         ) -> torch.Tensor | None:
        """Position ids for ``inputs`` from ``cache`` (None: the model computes its own)."""
        return None

    def eos_token_id(self, tok: Any) -> int | None:
        tokenizer = _tokenizer_of(tok)
        tid = tokenizer.convert_tokens_to_ids("<|im_end|>")
        if tid is None or tid == tokenizer.unk_token_id:
            return tokenizer.eos_token_id
        return int(tid)

    def _header_ids(self, tok: Any) -> list[int]:
        return list(_tokenizer_of(tok)(ASSISTANT_HEADER, add_special_tokens=False)["input_ids"])

    def prompt_mask_from_inputs(self, tok: Any, inputs: dict[str, Any], model: nn.Module | None = None
                                ) -> torch.Tensor:
        ids = inputs["input_ids"]
        att = inputs.get("attention_mask")
        att = torch.ones_like(ids, dtype=torch.bool) if att is None else att.bool()
        header = torch.tensor(self._header_ids(tok), device=ids.device)
        n = header.numel()
        mask = att.clone()
        for b in range(ids.shape[0]):
            row = ids[b]
            end = None
            for start in range(row.numel() - n, -1, -1):
                if torch.equal(row[start:start + n], header):
                    end = start + n
                    break
            if end is not None:
                mask[b, end:] = False
        return mask

    def generate(self, model: nn.Module, tok: Any, query: Query, max_new_tokens: int = 8) -> str:
        enc = self.encode_row(tok, query, with_target=False)
        device, dtype = model_device(model), model_dtype(model)
        enc = {k: (v.to(device=device, dtype=dtype) if v.is_floating_point() else v.to(device))
               for k, v in enc.items() if torch.is_tensor(v)}
        tokenizer = _tokenizer_of(tok)
        stops = [t for t in {self.eos_token_id(tok), tokenizer.eos_token_id} if t is not None]
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
        with torch.no_grad():
            out = model.generate(**enc, max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                                 eos_token_id=stops, pad_token_id=pad)
        new = out[0, enc["input_ids"].shape[1]:]
        return tokenizer.decode(new, skip_special_tokens=True).strip()

    # -- structure ---------------------------------------------------------------------
    def language_model(self, model: nn.Module) -> nn.Module:
        base = unwrap_model(model)
        inner = getattr(base, "model", None)
        lm = getattr(inner, "language_model", None)
        if lm is None:
            lm = getattr(base, "language_model", None)
        if lm is None or not hasattr(lm, "layers"):
            raise AttributeError(f"{type(base).__name__}: no language_model with decoder layers at "
                                 f"`model.language_model` (transformers 5 layout)")
        return lm

    def _names(self, model: nn.Module) -> dict[int, str]:
        return {id(m): n for n, m in unwrap_model(model).named_modules()}

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        names = self._names(model)
        out = []
        for i, layer in enumerate(self.language_model(model).layers):
            mlp = layer.mlp
            name = names[id(layer)]
            out.append(LayerInfo(
                index=i, name=name, layer=layer, mlp=mlp, value=mlp.down_proj, keys=[mlp.gate_proj, mlp.up_proj],
                attn=layer.self_attn, gated=True, act_fn=mlp.act_fn,
                ffn_in=HookPoint(mlp, "input"), ffn_out=HookPoint(mlp, "output"),
                value_in=HookPoint(mlp.down_proj, "input"), value_name=f"{name}.mlp.down_proj"))
        return out

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return unwrap_model(model).lm_head

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm


class QwenVLAdapterBase(HFChatAdapter):
    prepend_vision_tokens = True

    def images_for_row(self, image: Any, field: str = "image") -> list[Image.Image]:
        if isinstance(image, Image.Image):
            return [image]
        if isinstance(image, (list, tuple)) and image and all(isinstance(i, Image.Image) for i in image):
            return list(image)
        got = type(image).__name__
        if isinstance(image, (list, tuple)):
            got = f"{got} of {[type(i).__name__ for i in image]}" if image else "an empty list"
        raise RequestError(f"{self.family} expects a list of PIL.Image.Image (a single PIL image is also "
                           f"accepted), got {got}", field=field)


    def cached_image_features(self, inner: nn.Module, cache: EncoderCache, inputs: dict[str, Any]) -> Any:
        pixels, grid = inputs["pixel_values"], inputs.get("image_grid_thw")
        if grid is None:
            return None
        sizes = grid.prod(-1).tolist()
        if sum(sizes) != pixels.shape[0]:
            return None
        parts, start = [], 0
        for i, n in enumerate(sizes):
            chunk, g = pixels[start:start + n], grid[i:i + 1]
            start += n

            def encode(chunk: torch.Tensor = chunk, g: torch.Tensor = g) -> tuple[type, torch.Tensor, Any]:
                out = inner.get_image_features(chunk, g, return_dict=True)
                deep = getattr(out, "deepstack_features", None)
                return type(out), out.pooler_output[0], None if deep is None else [f[0] for f in deep]

            parts.append(cache.lookup(cache.key("image", (pixels, start - n, start), (grid, i, i + 1)), encode))
        cls = parts[0][0]
        fields: dict[str, Any] = {"pooler_output": tuple(p[1] for p in parts)}
        if parts[0][2] is not None:
            fields["deepstack_features"] = [tuple(p[2][j] for p in parts) for j in range(len(parts[0][2]))]
        return cls(**fields)

    def cached_positions(self, inner: nn.Module, cache: EncoderCache, inputs: dict[str, Any]
                         ) -> torch.Tensor | None:
        ids, types = inputs.get("input_ids"), inputs.get("mm_token_type_ids")
        if ids is None or types is None or inputs.get("video_grid_thw") is not None:
            return None
        grid, att = inputs.get("image_grid_thw"), inputs.get("attention_mask")

        def index() -> tuple[torch.Tensor, torch.Tensor]:
            return inner.get_rope_index(ids, mm_token_type_ids=types, image_grid_thw=grid, attention_mask=att)

        positions, deltas = cache.lookup(cache.key("rope", ids, types, grid, att), index)
        inner.rope_deltas = deltas  # what the model's own position pass leaves behind
        return positions


class Qwen2VLAdapter(QwenVLAdapterBase):
    """Qwen2-VL and Qwen2.5-VL (same input recipe and module layout)."""

    family = "qwen2-vl"
    markers = ("qwen2-vl", "qwen2_vl", "qwen2vl", "qwen2.5-vl", "qwen2_5_vl", "qwen2_5-vl", "qwen2.5_vl",
               "qwen2.5vl", "qwen25-vl", "qwen25vl")
    model_types = ("qwen2_vl", "qwen2_5_vl")
    class_names = ("Qwen2VLForConditionalGeneration", "Qwen2_5_VLForConditionalGeneration")


class Qwen3VLAdapter(QwenVLAdapterBase):
    family = "qwen3-vl"
    markers = ("qwen3-vl", "qwen3_vl", "qwen3vl")
    model_types = ("qwen3_vl",)
    class_names = ("Qwen3VLForConditionalGeneration",)


class LlavaOnevisionAdapter(HFChatAdapter):
    family = "llava-onevision"
    markers = ("llava-onevision", "llava_onevision")
    model_types = ("llava_onevision",)
    class_names = ("LlavaOnevisionForConditionalGeneration",)

    def images_for_row(self, image: Any, field: str = "image") -> list[Image.Image]:
        if isinstance(image, Image.Image):
            return [image]
        raise RequestError(f"llava-onevision expects a PIL.Image.Image, got {type(image).__name__}", field=field)

    def processor_images(self, images: list[Image.Image]) -> Any:
        return [images[0]] if len(images) == 1 else [images]

    def cached_image_features(self, inner: nn.Module, cache: EncoderCache, inputs: dict[str, Any]) -> Any:
        pixels, sizes, per_row = inputs["pixel_values"], inputs.get("image_sizes"), inputs.get("batch_num_images")
        if pixels.dim() != 5 or sizes is None or sizes.shape[0] != pixels.shape[0]:
            return None
        if per_row is not None and bool((per_row != 1).any()):
            return None  # several pictures in a row are not tiled: the model's own pass handles them
        parts = []
        for i in range(pixels.shape[0]):
            pix, size = pixels[i:i + 1], sizes[i:i + 1]
            one = None if per_row is None else per_row[:1]

            def encode(pix: torch.Tensor = pix, size: torch.Tensor = size, one: Any = one) -> tuple[type, torch.Tensor]:
                out = inner.get_image_features(pix, size, batch_num_images=one, return_dict=True)
                return type(out), out.pooler_output[0]

            parts.append(cache.lookup(cache.key("image", (pixels, i, i + 1), (sizes, i, i + 1), one), encode))
        return parts[0][0](pooler_output=tuple(p[1] for p in parts))
