"""Tiny stand-ins for EasyEdit's LAVIS-style wrappers (``Blip2OPT``, ``MiniGPT4``), built in memory.

Real BLIP-2 / MiniGPT-4 need multi-GB checkpoints. These stand-ins keep the *interface* EasyEdit
and the adapters rely on, with random weights and ~0.1 M parameters:

* ``model(samples)`` with ``text_input``, ``image`` (``(B, 3, 364, 364)`` or ``None``), ``labels``,
  ``prompts_len``; a list of such dicts is also accepted (rows padded on the right);
* output with ``.loss``, ``.logits``, ``.labels`` (-100 over the image prefix, the prompt and the
  padding) and ``.attention_mask``;
* the attribute layout of EasyEdit's wrappers (``visual_encoder``, ``ln_vision``, ``Qformer.bert``,
  ``query_tokens``, ``opt_proj``/``llama_proj``, ``opt_model``/``llama_model`` as a real
  transformers ``OPTForCausalLM``/``LlamaForCausalLM``, ``opt_tokenizer``/``llama_tokenizer``,
  ``maybe_autocast``), so EasyEdit's own wrapper code runs on them unchanged (the fixture
  recorder does exactly that to check this module's forward).

The text is tokenised by the wrapper with ``add_special_tokens=False`` and right padding; labels
mask pad ids and the first ``prompts_len`` text tokens. MiniGPT-4 wraps the image queries as
``###Human: <Img>`` + queries + ``</Img> `` and uses EOS as PAD.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mke_plugins.testing.tiny import SEED, round64, train_tokenizer

__all__ = ["TinyBlip2OPT", "TinyMiniGPT4", "build_tiny_lavis"]

N_QUERY = 4
VIS_DIM = 16
MINIGPT4_PROMPT = "###Human: <Img><ImageHere></Img> "


@dataclass
class LavisOutput:
    loss: torch.Tensor | None
    logits: torch.Tensor
    labels: torch.Tensor
    attention_mask: torch.Tensor


class _PatchEncoder(nn.Module):
    """(B, 3, 364, 364) -> (B, 49, VIS_DIM): one strided conv as the 'ViT'."""

    def __init__(self) -> None:
        super().__init__()
        self.num_features = VIS_DIM
        self.patch = nn.Conv2d(3, VIS_DIM, kernel_size=52, stride=52)

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        x = self.patch(image.to(self.patch.weight.dtype))
        return x.flatten(2).transpose(1, 2)


@dataclass
class _QOut:
    last_hidden_state: torch.Tensor


class _TinyQFormerBert(nn.Module):
    """Queries cross-attend to the image features, then an MLP (the Q-Former's call signature)."""

    def __init__(self) -> None:
        super().__init__()
        self.cross = nn.MultiheadAttention(VIS_DIM, num_heads=2, batch_first=True)
        self.mlp = nn.Sequential(nn.Linear(VIS_DIM, 2 * VIS_DIM), nn.GELU(), nn.Linear(2 * VIS_DIM, VIS_DIM))
        self.norm = nn.LayerNorm(VIS_DIM)

    def forward(self, query_embeds: torch.Tensor, encoder_hidden_states: torch.Tensor,
                encoder_attention_mask: torch.Tensor | None = None, return_dict: bool = True) -> _QOut:
        pad = None if encoder_attention_mask is None else encoder_attention_mask == 0
        att, _ = self.cross(query_embeds, encoder_hidden_states, encoder_hidden_states, key_padding_mask=pad)
        h = self.norm(query_embeds + att)
        return _QOut(h + self.mlp(h))


class _TinyQFormer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.bert = _TinyQFormerBert()


class _TinyLavisBase(nn.Module):
    """Image -> query embeddings -> LM prefix; subclasses name the LM and the prompt wrap."""

    proj_name = ""

    def __init__(self) -> None:
        super().__init__()
        self.config = None  # as in EasyEdit's wrappers
        self.visual_encoder = _PatchEncoder()
        self.ln_vision = nn.LayerNorm(VIS_DIM)
        self.Qformer = _TinyQFormer()
        self.query_tokens = nn.Parameter(torch.randn(1, N_QUERY, VIS_DIM) * 0.02)

    @property
    def device(self) -> torch.device:
        return self.query_tokens.device

    def maybe_autocast(self, dtype: torch.dtype = torch.float16):
        if self.device.type != "cpu":
            return torch.autocast(device_type=self.device.type, dtype=dtype)
        return contextlib.nullcontext()

    def image_queries(self, image: torch.Tensor) -> torch.Tensor:
        feats = self.ln_vision(self.visual_encoder(image))
        atts = torch.ones(feats.shape[:-1], dtype=torch.long, device=feats.device)
        q = self.query_tokens.expand(feats.shape[0], -1, -1)
        out = self.Qformer.bert(query_embeds=q, encoder_hidden_states=feats, encoder_attention_mask=atts,
                                return_dict=True)
        return getattr(self, self.proj_name)(out.last_hidden_state)

    # -- what subclasses provide ------------------------------------------------------------
    def _lm(self) -> nn.Module:
        raise NotImplementedError

    def _tok(self) -> Any:
        raise NotImplementedError

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self._lm().get_input_embeddings()(ids)

    def _prefix(self, image: torch.Tensor) -> torch.Tensor:
        return self.image_queries(image)

    def _text(self, text: str) -> str:
        return text

    # -- one sample dict -------------------------------------------------------------------
    def _encode(self, samples: dict[str, Any]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        tok = self._tok()
        tok.padding_side = "right"
        texts = [self._text(t) for t in samples["text_input"]]
        enc = tok(texts, return_tensors="pt", padding="longest", truncation=True, add_special_tokens=False)
        ids = enc["input_ids"].to(self.device)
        mask = enc["attention_mask"].to(self.device)
        labels = ids.masked_fill(ids == tok.pad_token_id, -100)
        for i, n in enumerate(samples.get("prompts_len") or []):
            labels[i, :n] = -100
        embeds = self._embed(ids)
        if samples.get("image") is not None:
            prefix = self._prefix(samples["image"].to(self.device))
            prefix = prefix.to(embeds.dtype)
            embeds = torch.cat([prefix, embeds], dim=1)
            ones = torch.ones(prefix.shape[:2], dtype=mask.dtype, device=mask.device)
            mask = torch.cat([ones, mask], dim=1)
            labels = torch.cat([torch.full(prefix.shape[:2], -100, dtype=labels.dtype, device=labels.device),
                                labels], dim=1)
        return embeds, mask, labels

    def forward(self, samples: dict[str, Any] | list[dict[str, Any]]) -> LavisOutput:
        if isinstance(samples, (list, tuple)):
            parts = [self._encode(s) for s in samples]
            T = max(p[0].shape[1] for p in parts)

            def pad(x: torch.Tensor, value: float) -> torch.Tensor:
                extra = T - x.shape[1]
                if extra == 0:
                    return x
                filler = torch.full((x.shape[0], extra, *x.shape[2:]), value, dtype=x.dtype, device=x.device)
                return torch.cat([x, filler], dim=1)

            embeds = torch.cat([pad(p[0], 0) for p in parts])
            mask = torch.cat([pad(p[1], 0) for p in parts])
            labels = torch.cat([pad(p[2], -100) for p in parts])
        else:
            embeds, mask, labels = self._encode(samples)
        with self.maybe_autocast():
            out = self._lm()(inputs_embeds=embeds, attention_mask=mask, labels=labels, return_dict=True)
        return LavisOutput(loss=out.loss, logits=out.logits, labels=labels, attention_mask=mask)


class TinyBlip2OPT(_TinyLavisBase):
    """Blip2OPT-shaped: query embeddings, then the text, into a tiny ``OPTForCausalLM``."""

    proj_name = "opt_proj"

    def __init__(self, tokenizer: Any) -> None:
        from transformers import OPTConfig, OPTForCausalLM

        super().__init__()
        self.opt_tokenizer = tokenizer
        cfg = OPTConfig(vocab_size=round64(len(tokenizer)), hidden_size=32, ffn_dim=64, num_hidden_layers=4,
                        num_attention_heads=2, max_position_embeddings=512, word_embed_proj_dim=32,
                        pad_token_id=tokenizer.pad_token_id, bos_token_id=tokenizer.eos_token_id,
                        eos_token_id=tokenizer.eos_token_id, dropout=0.0, attention_dropout=0.0)
        self.opt_model = OPTForCausalLM(cfg)
        self.opt_proj = nn.Linear(VIS_DIM, cfg.hidden_size)
        self.eos_token_id = tokenizer("\n", add_special_tokens=False).input_ids[0]
        self.prompt = ""
        self.max_txt_len = 256

    def _lm(self) -> nn.Module:
        return self.opt_model

    def _tok(self) -> Any:
        return self.opt_tokenizer


class TinyMiniGPT4(_TinyLavisBase):
    """MiniGPT4-shaped: ``###Human: <Img>`` + queries + ``</Img> `` + text into a tiny ``LlamaForCausalLM``."""

    proj_name = "llama_proj"

    def __init__(self, tokenizer: Any) -> None:
        from transformers import LlamaConfig, LlamaForCausalLM

        super().__init__()
        tokenizer.pad_token = tokenizer.eos_token
        self.llama_tokenizer = tokenizer
        cfg = LlamaConfig(vocab_size=round64(len(tokenizer)), hidden_size=32, intermediate_size=64,
                          num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=1,
                          max_position_embeddings=512, pad_token_id=tokenizer.pad_token_id,
                          bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                          tie_word_embeddings=False)
        self.llama_model = LlamaForCausalLM(cfg)
        self.llama_proj = nn.Linear(VIS_DIM, cfg.hidden_size)
        self.low_resource = False
        self.end_sym = ""
        self.prompt = True
        self.prompt_list: list[str] = []
        self.max_txt_len = 256

    def _lm(self) -> nn.Module:
        return self.llama_model

    def _tok(self) -> Any:
        return self.llama_tokenizer

    def _text(self, text: str) -> str:
        return text + self.end_sym

    def _prefix(self, image: torch.Tensor) -> torch.Tensor:
        q = self.image_queries(image)
        before, after = MINIGPT4_PROMPT.split("<ImageHere>")
        tok = self.llama_tokenizer

        def emb(s: str) -> torch.Tensor:
            ids = tok(s, return_tensors="pt", add_special_tokens=False).input_ids.to(self.device)
            return self._embed(ids).expand(q.shape[0], -1, -1)

        head, tail = emb(before), emb(after)
        return torch.cat([head, q.to(head.dtype), tail], dim=1)


def _lavis_tokenizer(family: str):
    if family == "blip2":  # OPT: </s> is BOS and EOS, <pad> separate
        return train_tokenizer(["<pad>", "</s>", "<unk>"], eos="</s>", pad="<pad>", bos="</s>", unk="<unk>",
                               padding_side="right")
    return train_tokenizer(["<unk>", "<s>", "</s>"], eos="</s>", pad="</s>", bos="<s>", unk="<unk>",
                           padding_side="right")


def build_tiny_lavis(family: str, dtype: torch.dtype = torch.float32) -> tuple[nn.Module, Any]:
    """A fresh, seeded tiny ``blip2`` or ``minigpt4`` wrapper (eval mode) and the tokenizer for ``apply``."""
    if family not in ("blip2", "minigpt4"):
        raise ValueError(f"unknown LAVIS family {family!r}; choose 'blip2' or 'minigpt4'")
    tok = _lavis_tokenizer(family)
    torch.manual_seed(SEED)
    model = TinyBlip2OPT(tok) if family == "blip2" else TinyMiniGPT4(tok)
    model = model.to(dtype).eval()
    return model, tok
