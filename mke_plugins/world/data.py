"""Batches of world queries as Qwen2-VL tensors, built the way EasyEdit's evaluator builds them.

Each row is ``apply_chat_template([{"role": "user", "content": [{"type": "image"}] * n +
[{"type": "text", "text": prompt}]}], add_generation_prompt=True, tokenize=False) + target``
(``n`` = 1 for picture forms, 0 for text-only), tokenised by the world processor; the label is
the target token, right-aligned. For training speed the token ids of every distinct prompt are
computed once and pictures are patchified here with the image processor's exact arithmetic
(checked against the processor by :func:`check_against_processor`). Rows are left-padded.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np
import torch

from .queries import Question, answer, prompt
from .render import SIZE, render_array
from .spec import World

PATCH, TEMPORAL, MERGE = 14, 2, 2


@dataclass(frozen=True)
class Item:
    """A question about an entity and (for picture forms) the rendering shown with it."""

    question: Question
    rendering: int | None
    text: str | None = None  # overrides the question's text (training augmentation)


def chat_text(processor: Any, text: str, has_image: bool) -> str:
    content = ([{"type": "image"}] if has_image else []) + [{"type": "text", "text": text}]
    return processor.apply_chat_template([{"role": "user", "content": content}],
                                         add_generation_prompt=True, tokenize=False)


class Encoder:
    """Caches token ids per (prompt, has-image) and pictures per (entity, rendering)."""

    def __init__(self, world: World, processor: Any):
        self.world, self.processor = world, processor
        self.tok = processor.tokenizer
        self.pad_id = self.tok.pad_token_id
        self.image_token_id = self.tok.convert_tokens_to_ids("<|image_pad|>")
        ip = processor.image_processor
        self.mean = torch.tensor(ip.image_mean, dtype=torch.float32).view(3, 1, 1)
        self.std = torch.tensor(ip.image_std, dtype=torch.float32).view(3, 1, 1)
        self.scale = float(ip.rescale_factor)
        self.n_image_tokens = (SIZE // PATCH) ** 2 // MERGE**2
        self._ids: dict[tuple[str, bool], list[int]] = {}
        self._target: dict[str, int] = {}
        self._pix: dict[tuple[int, int], np.ndarray] = {}

    def prompt_ids(self, text: str, has_image: bool) -> list[int]:
        key = (text, has_image)
        if key not in self._ids:
            chat = chat_text(self.processor, text, has_image)
            chat = chat.replace("<|image_pad|>", "<|image_pad|>" * self.n_image_tokens)
            self._ids[key] = self.tok(chat, add_special_tokens=False).input_ids
        return self._ids[key]

    def target_id(self, target: str) -> int:
        if target not in self._target:
            ids = self.tok(target, add_special_tokens=False).input_ids
            if len(ids) != 1 or ids[0] == self.tok.unk_token_id:
                raise ValueError(f"world answer {target!r} is not one known token: {ids}")
            self._target[target] = ids[0]
        return self._target[target]

    def picture(self, entity: int, index: int) -> np.ndarray:
        key = (entity, index)
        if key not in self._pix:
            self._pix[key] = render_array(self.world.seed, self.world.entities[entity], index)
        return self._pix[key]

    def patchify(self, arrays: Sequence[np.ndarray]) -> torch.Tensor:
        """``(n*16, 1176)`` pixel values, as ``Qwen2VLImageProcessor`` lays them out."""
        if not arrays:
            return torch.zeros(0, 3 * TEMPORAL * PATCH * PATCH)
        x = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float()  # (n, 3, H, W)
        x = (x * self.scale - self.mean) / self.std
        n, c, h, w = x.shape
        gh, gw = h // PATCH, w // PATCH
        x = x.unsqueeze(1).expand(n, TEMPORAL, c, h, w)
        x = x.reshape(n, 1, TEMPORAL, c, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
        x = x.permute(0, 1, 4, 7, 5, 8, 3, 2, 6, 9)
        return x.reshape(n * gh * gw, c * TEMPORAL * PATCH * PATCH).contiguous()

    def encode(self, items: Sequence[Item], targets: Sequence[str] | None = None) -> dict[str, torch.Tensor]:
        """Left-padded model inputs plus ``target_ids`` (B,) for ``items``."""
        rows, tids, pics = [], [], []
        for k, it in enumerate(items):
            q = it.question
            text = it.text if it.text is not None else prompt(self.world, q)
            tgt = targets[k] if targets is not None else answer(self.world, self.world.entities[q.entity], q.relation)
            tid = self.target_id(tgt)
            rows.append(self.prompt_ids(text, q.has_image) + [tid])
            tids.append(tid)
            if q.has_image:
                if it.rendering is None:
                    raise ValueError(f"{q} needs a rendering")
                pics.append(self.picture(q.entity, it.rendering))
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        out: dict[str, torch.Tensor] = {"input_ids": ids, "attention_mask": mask,
                                        "mm_token_type_ids": (ids == self.image_token_id).long(),
                                        "target_ids": torch.tensor(tids)}
        if pics:
            out["pixel_values"] = self.patchify(pics)
            g = SIZE // PATCH
            out["image_grid_thw"] = torch.tensor([[1, g, g]] * len(pics))
        return out


def check_against_processor(enc: Encoder, items: Sequence[Item]) -> None:
    """Raise if :meth:`Encoder.encode` differs from the processor on ``items`` (one row each)."""
    from PIL import Image

    for it in items:
        q = it.question
        text = prompt(enc.world, q)
        tgt = answer(enc.world, enc.world.entities[q.entity], q.relation)
        chat = chat_text(enc.processor, text, q.has_image)
        kwargs: dict[str, Any] = {"text": [chat + tgt], "return_tensors": "pt", "padding": True}
        if q.has_image:
            kwargs["images"] = [Image.fromarray(enc.picture(q.entity, it.rendering))]
        ref = enc.processor(**kwargs)
        mine = enc.encode([it])
        if not torch.equal(ref["input_ids"], mine["input_ids"]):
            raise AssertionError(f"token ids differ for {q}: {ref['input_ids']} vs {mine['input_ids']}")
        if q.has_image:
            if not torch.allclose(ref["pixel_values"], mine["pixel_values"], atol=1e-5):
                raise AssertionError(f"pixel values differ for {q}")
            if not torch.equal(ref["image_grid_thw"], mine["image_grid_thw"]):
                raise AssertionError(f"image_grid_thw differs for {q}")
            if not torch.equal(ref["mm_token_type_ids"], mine["mm_token_type_ids"]):
                raise AssertionError(f"mm_token_type_ids differ for {q}")
