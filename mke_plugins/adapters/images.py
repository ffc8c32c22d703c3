"""Turn a picture on disk (or a PIL image) into the image object a family's requests carry.

EasyEdit's datasets hand every family its own image type (``hooks/EASYEDIT-NOTES.md``, "The family
and its image type"): a list of one PIL RGB image resized by ``qwen_vl_utils.fetch_image`` for the
Qwen-VL families, the PIL image straight from ``Image.open`` for LLaVA-OneVision, and a
``(3, 364, 364)`` float tensor from LAVIS's ``BlipImageEvalProcessor`` for BLIP-2 / MiniGPT-4.
Loaders outside EasyEdit (the bench's ``--data`` folders) must build the same objects, without
``qwen_vl_utils`` or torchvision, so this module reproduces those three recipes with PIL and
numpy.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from PIL import Image

#: ``qwen_vl_utils`` defaults: 28-pixel factor (patch 14 x merge 2), 4..16384 merged patches
QWEN_FACTOR = 28
QWEN_MIN_PIXELS = 4 * 28 * 28
QWEN_MAX_PIXELS = 16384 * 28 * 28
QWEN_MAX_RATIO = 200
#: LAVIS ``BlipImageEvalProcessor(image_size=364)`` with its default CLIP normalisation
BLIP_SIZE = 364
BLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
BLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def _open(image: Any) -> Image.Image:
    if isinstance(image, Image.Image):
        return image
    if isinstance(image, (str, Path)):
        with Image.open(image) as im:
            im.load()
            return im
    raise TypeError(f"expected a PIL image or an image path, got {type(image).__name__}")


def _to_rgb(image: Image.Image) -> Image.Image:
    """RGB as ``qwen_vl_utils`` makes it: transparent pixels go onto white."""
    if image.mode == "RGBA":
        white = Image.new("RGB", image.size, (255, 255, 255))
        white.paste(image, mask=image.split()[3])
        return white
    return image.convert("RGB")


def qwen_smart_resize(height: int, width: int, factor: int = QWEN_FACTOR, min_pixels: int = QWEN_MIN_PIXELS,
                      max_pixels: int = QWEN_MAX_PIXELS) -> tuple[int, int]:
    """``qwen_vl_utils.smart_resize``: sides divisible by ``factor``, pixel count within bounds."""
    if max(height, width) / min(height, width) > QWEN_MAX_RATIO:
        raise ValueError(f"image aspect ratio {max(height, width) / min(height, width):.0f} is above "
                         f"{QWEN_MAX_RATIO}; Qwen-VL cannot take it")
    h = max(factor, round(height / factor) * factor)
    w = max(factor, round(width / factor) * factor)
    if h * w > max_pixels:
        beta = math.sqrt((height * width) / max_pixels)
        h = max(factor, math.floor(height / beta / factor) * factor)
        w = max(factor, math.floor(width / beta / factor) * factor)
    elif h * w < min_pixels:
        beta = math.sqrt(min_pixels / (height * width))
        h = math.ceil(height * beta / factor) * factor
        w = math.ceil(width * beta / factor) * factor
    return h, w


def qwen_image(image: Any) -> list[Image.Image]:
    """Qwen2-VL / Qwen2.5-VL / Qwen3-VL: ``[fetch_image(image)]``."""
    im = _to_rgb(_open(image))
    h, w = qwen_smart_resize(im.height, im.width)
    if (h, w) != (im.height, im.width):
        im = im.resize((w, h))
    return [im]


def blip_image(image: Any):
    """BLIP-2 / MiniGPT-4: bicubic resize to 364 x 364, scale to [0, 1], CLIP-normalise; ``(3, 364, 364)``."""
    import numpy as np
    import torch

    im = _open(image).convert("RGB").resize((BLIP_SIZE, BLIP_SIZE), Image.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32).copy()).permute(2, 0, 1) / 255.0
    mean = torch.tensor(BLIP_MEAN).view(3, 1, 1)
    std = torch.tensor(BLIP_STD).view(3, 1, 1)
    return (x - mean) / std


def image_for_family(adapter: Any, image: Any) -> Any:
    """The family-native image for ``adapter`` (an adapter instance or class, or a family name)."""
    family = adapter if isinstance(adapter, str) else getattr(adapter, "family", "")
    if family in ("qwen2-vl", "qwen3-vl"):
        return qwen_image(image)
    if family == "llava-onevision":
        return _open(image)
    if family in ("blip2", "minigpt4"):
        return blip_image(image)
    raise ValueError(f"no image recipe for family {family!r}; known: qwen2-vl, qwen3-vl, llava-onevision, "
                     f"blip2, minigpt4")
