"""Adapters for EasyEdit's LAVIS-style wrappers: ``blip2`` (Blip2OPT) and ``minigpt4`` (MiniGPT4).

These models are called as ``model(samples)`` with ``text_input``, ``image``, ``labels`` and
``prompts_len`` (EasyEdit's ``prepare_multimodal_edit``) and tokenise the text themselves, with
right padding, after a prefix of image query embeddings (MiniGPT-4 wraps them in
``###Human: <Img>`` ... ``</Img> ``). The adapter builds the same sample dict for a batch of one
and a list of per-row sample dicts (the wrappers' list mode) for larger batches, and computes
the labels the wrapper will return (``outputs.labels``) so methods have them before the forward.

The wrappers' forward takes no precomputed image features, so inside an encoder cache
(``adapter.encoder_cache(model)``) the vision encoder's ``forward`` is swapped for one that
returns the stored output for a picture it has already encoded; the swap is undone when the
context exits. (The Q-Former after it still runs: it reads the learned query tokens.)
"""

from __future__ import annotations

import contextlib
from typing import Any, Iterator, Sequence

import torch
from torch import nn

from mke_hooks.errors import RequestError
from mke_plugins.adapters.base import Batch, HookPoint, LayerInfo, Query, VLMAdapter, model_device, unwrap_model
from mke_plugins.adapters.encoder_cache import EncoderCache

MINIGPT4_IMAGE_PROMPT = "###Human: <Img><ImageHere></Img> "


@contextlib.contextmanager
def _cached_forward(module: nn.Module, cache: EncoderCache) -> Iterator[None]:
    """Swap ``module.forward`` for a cached one (single-tensor calls only) until the block exits."""
    own = vars(module).get("forward")
    original = module.forward

    def forward(image: Any, *args: Any, **kwargs: Any) -> Any:
        if args or kwargs or not torch.is_tensor(image) or not cache.usable(image):
            return original(image, *args, **kwargs)
        return cache.lookup(cache.key("vision", image), lambda: original(image))

    module.forward = forward
    try:
        yield
    finally:
        if own is not None:
            module.forward = own
        else:
            vars(module).pop("forward", None)


class LavisAdapter(VLMAdapter):
    """Shared logic; subclasses name the LM and its tokenizer attributes."""

    lm_attr = ""
    tok_attr = ""

    @classmethod
    def matches_name(cls, model_name: str) -> bool:
        return str(model_name).strip().lower() == cls.family

    @classmethod
    def matches_model(cls, model: nn.Module) -> bool:
        base = unwrap_model(model)
        return hasattr(base, cls.lm_attr) and hasattr(base, "query_tokens")

    # -- images ------------------------------------------------------------------------
    def validate_image(self, image: Any, field: str = "image") -> torch.Tensor:
        ok = torch.is_tensor(image) and image.is_floating_point() and (
            (image.dim() == 3 and image.shape[0] == 3) or (image.dim() == 4 and image.shape[:2] == (1, 3)))
        if not ok:
            got = (f"tensor {tuple(image.shape)} {image.dtype}" if torch.is_tensor(image) else type(image).__name__)
            raise RequestError(f"{self.family} expects a float tensor of shape (3, 364, 364) (EasyEdit's "
                               f"BlipImageEvalProcessor output), got {got}", field=field)
        return image if image.dim() == 4 else image.unsqueeze(0)

    # -- tokenisation ------------------------------------------------------------------
    def lm_tokenizer(self, model: nn.Module, tok: Any = None) -> Any:
        lm_tok = getattr(unwrap_model(model), self.tok_attr, None)
        if lm_tok is None:
            lm_tok = tok
        if lm_tok is None:
            raise ValueError(f"{self.family}: the model has no `{self.tok_attr}` and no tokenizer was given")
        return lm_tok

    def prefix_sizes(self, model: nn.Module, has_image: bool) -> tuple[int, int, int]:
        """(text before, image queries, text after) positions the wrapper puts before the text."""
        if not has_image:
            return 0, 0, 0
        return 0, int(unwrap_model(model).query_tokens.shape[1]), 0

    @staticmethod
    def spaced_target(target: str) -> str:
        return target if target[:1] == " " else " " + target

    def sample(self, model: nn.Module, tok: Any, query: Query, *, append_eos: bool = False,
               with_target: bool = True) -> dict[str, Any]:
        """EasyEdit's ``prepare_multimodal_edit`` sample for one query (image on the model's device)."""
        image = None
        if query.image is not None:
            image = self.validate_image(query.image).to(model_device(model))
        target = self.spaced_target(query.target) if with_target else ""
        if append_eos:
            target = target + self.lm_tokenizer(model, tok).eos_token
        if target:
            labels = tok([target], add_special_tokens=False, return_tensors="pt")["input_ids"]
        else:
            labels = torch.zeros((1, 0), dtype=torch.long)
        return {"text_input": [query.prompt + target], "image": image, "labels": labels,
                "prompts_len": [len(tok.encode(query.prompt, add_special_tokens=False))]}

    def batch(self, model: nn.Module, tok: Any, queries: Sequence[Query], *, append_eos: bool = False,
              dtype: torch.dtype | None = None) -> Batch:
        queries = list(queries)
        if not queries:
            raise ValueError("batch() needs at least one Query")
        lm_tok = self.lm_tokenizer(model, tok)
        eos = self.eos_token_id(lm_tok) if append_eos else None
        samples, rows = [], []
        for q in queries:
            if not q.target:
                raise RequestError("target is empty", field="target")
            s = self.sample(model, tok, q, append_eos=append_eos)
            if dtype is not None and s["image"] is not None:
                s["image"] = s["image"].to(dtype)
            samples.append(s)
            ids = list(lm_tok(s["text_input"][0], add_special_tokens=False)["input_ids"])
            lab = [-100 if t == lm_tok.pad_token_id else t for t in ids]
            lab[:s["prompts_len"][0]] = [-100] * min(s["prompts_len"][0], len(lab))
            if eos is not None and ids and ids[-1] == eos:
                lab[-1] = eos  # the wrapper masks it when pad == eos (MiniGPT-4); we train on it
            before, nq, after = self.prefix_sizes(model, s["image"] is not None)
            pre = before + nq + after
            rows.append(([-100] * pre + lab, [1] * (pre + len(ids)),
                         [False] * before + [True] * nq + [False] * (after + len(ids))))
        T = max(len(r[0]) for r in rows)
        device = model_device(model)
        labels = torch.tensor([r[0] + [-100] * (T - len(r[0])) for r in rows], dtype=torch.long, device=device)
        att = torch.tensor([r[1] + [0] * (T - len(r[1])) for r in rows], dtype=torch.long, device=device)
        img = torch.tensor([r[2] + [False] * (T - len(r[2])) for r in rows], dtype=torch.bool, device=device)
        inputs: Any = samples[0] if len(samples) == 1 else samples
        return Batch(inputs={"samples": inputs}, labels=labels, attention_mask=att, image_mask=img,
                     queries=queries)

    def forward(self, model: nn.Module, batch: Batch) -> torch.Tensor:
        out = model(batch.inputs["samples"])
        logits = out.logits if hasattr(out, "logits") else out
        if tuple(logits.shape[:2]) != tuple(batch.labels.shape):
            raise RuntimeError(f"{self.family}: the wrapper returned logits of shape {tuple(logits.shape[:2])} but the "
                               f"adapter expected {tuple(batch.labels.shape)}; the wrapper's prefix or tokenizer "
                               f"differs from EasyEdit's Blip2OPT/MiniGPT4 convention")
        return logits

    def eos_token_id(self, tok: Any) -> int | None:
        return getattr(tok, "eos_token_id", None)

    # -- encoder cache -------------------------------------------------------------------
    def encoder_towers(self, model: nn.Module) -> tuple[list[nn.Module], list[nn.Parameter]]:
        encoder = getattr(unwrap_model(model), "visual_encoder", None)
        return ([encoder], []) if isinstance(encoder, nn.Module) else ([], [])

    def encoder_patches(self, model: nn.Module, cache: EncoderCache) -> list[contextlib.AbstractContextManager]:
        return [_cached_forward(unwrap_model(model).visual_encoder, cache)]

    def prompt_mask_from_inputs(self, tok: Any, inputs: dict[str, Any], model: nn.Module | None = None
                                ) -> torch.Tensor:
        if model is None:
            raise ValueError(f"{self.family}: prompt_mask_from_inputs needs model= (the image prefix length and the "
                             f"wrapper's tokenizer come from it)")
        samples = inputs.get("samples", inputs) if isinstance(inputs, dict) else inputs
        samples = [samples] if isinstance(samples, dict) else list(samples)
        lm_tok = self.lm_tokenizer(model, tok)
        rows = []
        for s in samples:
            n_text = len(lm_tok(s["text_input"][0], add_special_tokens=False)["input_ids"])
            pre = sum(self.prefix_sizes(model, s["image"] is not None))
            p = min(int(s["prompts_len"][0]), n_text)
            rows.append([True] * (pre + p) + [False] * (n_text - p))
        T = max(len(r) for r in rows)
        return torch.tensor([r + [False] * (T - len(r)) for r in rows], dtype=torch.bool, device=model_device(model))

    def generate(self, model: nn.Module, tok: Any, query: Query, max_new_tokens: int = 8) -> str:
        lm_tok = self.lm_tokenizer(model, tok)
        eos = lm_tok.eos_token_id
        gen: list[int] = []
        base = self.sample(model, tok, query, with_target=False)
        with torch.no_grad():
            for _ in range(max_new_tokens):
                s = dict(base, text_input=[query.prompt + lm_tok.decode(gen)])
                out = model(s)
                nxt = int(out.logits[0, -1].argmax())
                if nxt == eos:
                    break
                gen.append(nxt)
                if "\n" in lm_tok.decode(gen):
                    break
        return lm_tok.decode(gen, skip_special_tokens=True).strip()

    # -- structure ---------------------------------------------------------------------
    def lm(self, model: nn.Module) -> nn.Module:
        return getattr(unwrap_model(model), self.lm_attr)

    def lm_head(self, model: nn.Module) -> nn.Linear:
        return self.lm(model).lm_head

    def _names(self, model: nn.Module) -> dict[int, str]:
        return {id(m): n for n, m in unwrap_model(model).named_modules()}


class Blip2Adapter(LavisAdapter):
    """EasyEdit's Blip2OPT: an OPT decoder (``fc1``/``fc2`` FFN, flattened to (B*T, d))."""

    family = "blip2"
    markers = ("blip2",)
    lm_attr = "opt_model"
    tok_attr = "opt_tokenizer"

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.lm(model).model.decoder

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        names = self._names(model)
        out = []
        for i, layer in enumerate(self.language_model(model).layers):
            name = names[id(layer)]
            out.append(LayerInfo(
                index=i, name=name, layer=layer, mlp=None, value=layer.fc2, keys=[layer.fc1], attn=layer.self_attn,
                gated=False, act_fn=layer.activation_fn, ffn_in=HookPoint(layer.fc1, "input"),
                ffn_out=HookPoint(layer.fc2, "output"), value_in=HookPoint(layer.fc2, "input"),
                value_name=f"{name}.fc2", ffn_flat=True))
        return out

    def final_norm(self, model: nn.Module) -> nn.Module:
        norm = self.language_model(model).final_layer_norm
        return norm if norm is not None else nn.Identity()


class MiniGPT4Adapter(LavisAdapter):
    """EasyEdit's MiniGPT4: a LLaMA decoder; the image queries sit inside ``###Human: <Img>...</Img> ``."""

    family = "minigpt4"
    markers = ("minigpt4",)
    lm_attr = "llama_model"
    tok_attr = "llama_tokenizer"

    def prefix_sizes(self, model: nn.Module, has_image: bool) -> tuple[int, int, int]:
        if not has_image:
            return 0, 0, 0
        lm_tok = self.lm_tokenizer(model)
        before, after = MINIGPT4_IMAGE_PROMPT.split("<ImageHere>")
        nb = len(lm_tok(before, add_special_tokens=False)["input_ids"])
        na = len(lm_tok(after, add_special_tokens=False)["input_ids"])
        return nb, int(unwrap_model(model).query_tokens.shape[1]), na

    def language_model(self, model: nn.Module) -> nn.Module:
        return self.lm(model).model

    def layers(self, model: nn.Module) -> list[LayerInfo]:
        names = self._names(model)
        out = []
        for i, layer in enumerate(self.language_model(model).layers):
            mlp, name = layer.mlp, names[id(layer)]
            out.append(LayerInfo(
                index=i, name=name, layer=layer, mlp=mlp, value=mlp.down_proj, keys=[mlp.gate_proj, mlp.up_proj],
                attn=layer.self_attn, gated=True, act_fn=mlp.act_fn, ffn_in=HookPoint(mlp, "input"),
                ffn_out=HookPoint(mlp, "output"), value_in=HookPoint(mlp.down_proj, "input"),
                value_name=f"{name}.mlp.down_proj"))
        return out

    def final_norm(self, model: nn.Module) -> nn.Module:
        return self.language_model(model).norm
