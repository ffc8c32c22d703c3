"""Small deterministic test images, so tests and tiny-model checks never read files from disk.

A 56x56 image costs 4 visual tokens in the tiny Qwen models (14 px patches, 2x2 merge) and one
base crop in the tiny LLaVA-OneVision model; the LAVIS-style tiny models take the
``(3, 364, 364)`` float tensor EasyEdit's ``BlipImageEvalProcessor`` would produce.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image, ImageDraw


def make_image(seed: int = 0, size: int = 56) -> Image.Image:
    """An RGB PIL image with a coloured background and a shape that depend on ``seed``."""
    rng = torch.Generator().manual_seed(int(seed))
    bg = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=rng))
    fg = tuple(int(v) for v in torch.randint(0, 256, (3,), generator=rng))
    img = Image.new("RGB", (size, size), bg)
    draw = ImageDraw.Draw(img)
    a, b = (int(v) for v in torch.randint(2, size // 2, (2,), generator=rng))
    if seed % 2 == 0:
        draw.ellipse([a, b, a + size // 3, b + size // 3], fill=fg)
    else:
        draw.rectangle([a, b, a + size // 3, b + size // 4], fill=fg)
    return img


def make_lavis_image(seed: int = 0, size: int = 364) -> torch.Tensor:
    """A ``(3, size, size)`` float32 tensor like EasyEdit's BLIP eval processor output."""
    img = make_image(seed, 56).resize((size, size))
    data = torch.from_numpy(np.asarray(img, dtype=np.float32).copy())  # (H, W, 3)
    data = data.permute(2, 0, 1) / 255.0
    mean = torch.tensor([0.48145466, 0.4578275, 0.40821073]).view(3, 1, 1)
    std = torch.tensor([0.26862954, 0.26130258, 0.27577711]).view(3, 1, 1)
    return ((data - mean) / std).contiguous()


#: families whose images are EasyEdit's preprocessed tensors (LAVIS models)
LAVIS_FAMILIES = ("blip2", "minigpt4")


def native_image(family: str, seed: int = 0) -> object:
    """A request ``image`` in the form EasyEdit hands each family's tiny model.

    LAVIS families get the BLIP-processed tensor, LLaVA-OneVision a PIL image, the Qwen
    families a list of one PIL image (what EasyEdit's VQA dataset yields for them).
    """
    if family in LAVIS_FAMILIES:
        return make_lavis_image(seed)
    if family == "llava-onevision":
        return make_image(seed)
    return [make_image(seed)]
