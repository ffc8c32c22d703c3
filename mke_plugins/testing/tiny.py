"""Tiny, randomly initialised models of every supported family, built offline in seconds.

Tests, the conformance kit and the EasyEdit host check need real model *classes* (so module
paths, processors and chat templates are the real ones) without downloading weights. This
module builds them from configs: a byte-level BPE tokenizer trained in process on a small
built-in corpus, the family's special tokens and chat template, image and video processor
configs, and a model of roughly 0.2 M parameters, saved under a directory whose name carries the
family marker EasyEdit detects (``tiny-qwen2-vl``, ``tiny-qwen2.5-vl``, ``tiny-qwen3-vl``,
``tiny-llava-onevision``). The LAVIS-style families (``blip2``, ``minigpt4``) are in-memory
stand-ins for EasyEdit's ``Blip2OPT`` / ``MiniGPT4`` wrappers (see ``tiny_lavis.py``).

Everything is seeded: building twice gives identical weights and tokenizers.
"""

from __future__ import annotations

import json
import threading
from pathlib import Path
from typing import Any

import torch

from mke_plugins.testing.images import make_image

__all__ = ["HF_FAMILIES", "build_tiny", "load_tiny", "make_image", "train_tokenizer", "TINY_DIRS"]

#: family -> directory name (the family marker EasyEdit and ``get_adapter`` detect)
TINY_DIRS: dict[str, str] = {
    "qwen2-vl": "tiny-qwen2-vl",
    "qwen2.5-vl": "tiny-qwen2.5-vl",
    "qwen3-vl": "tiny-qwen3-vl",
    "llava-onevision": "tiny-llava-onevision",
}
HF_FAMILIES = tuple(TINY_DIRS)

SEED = 1234
_LOCK = threading.Lock()

_CORPUS = """
The capital of France is Paris. The capital of Italy is Rome. What is in the picture?
The animal in the image is a cat. The color of the car is red, blue, green, yellow or black.
Question: what is the name of the person shown? Short answer: Alice. Who painted this?
A dog sits on a red mat next to a small wooden table. The sky is blue and the grass is green.
Describe the image in one word. Answer the question with a single word or phrase.
You are a helpful assistant. user assistant system image video picture photo scene object
zero one two three four five six seven eight nine ten 0 1 2 3 4 5 6 7 8 9 10 100 2024
Tokyo Berlin Madrid London Moscow Cairo Lima Oslo apple banana cherry lemon orange grape
circle square triangle star heart moon sun tree house river mountain bridge tower city
"""

QWEN_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>",
                 "<|image_pad|>", "<|video_pad|>"]
LLAVA_SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<image>", "<video>"]

_SYSTEM = ("{% if messages[0]['role'] != 'system' %}"
           "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}")
QWEN_CHAT_TEMPLATE = (
    _SYSTEM
    + "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}"
    "{% if item['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif item['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
    "{% endfor %}{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }} "
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for item in message['content'] %}{% if item['type'] == 'image' %}<image>{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'video' %}<video>{% endif %}{% endfor %}"
    "{% for item in message['content'] %}{% if item['type'] == 'text' %}{{ '\\n' + item['text'] }}{% endif %}"
    "{% endfor %}"
    "{% endif %}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def round64(n: int) -> int:
    """``n`` rounded up to a multiple of 64 (vocabulary sizes)."""
    return (n + 63) // 64 * 64


def train_tokenizer(specials: list[str], vocab_size: int = 400, extra_tokens: dict[str, str] | None = None, *,
                    eos: str | None = None, pad: str | None = None, bos: str | None = None, unk: str | None = None,
                    padding_side: str = "left"):
    """A fast byte-level BPE tokenizer trained on the built-in corpus, with ``specials`` added.

    EOS and PAD default to the first special (``<|endoftext|>`` for the chat families); padding is
    on the left unless ``padding_side`` says otherwise. ``extra_tokens`` sets named attributes
    such as ``image_token``.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(specials), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tk.train_from_iterator([_CORPUS] * 4, trainer=trainer)
    named = {"eos_token": eos or specials[0], "pad_token": pad or specials[0]}
    if bos:
        named["bos_token"] = bos
    if unk:
        named["unk_token"] = unk
    fast = PreTrainedTokenizerFast(tokenizer_object=tk, padding_side=padding_side, model_max_length=4096,
                                   extra_special_tokens=extra_tokens or {}, **named)
    rest = [t for t in specials if t not in named.values()]
    if rest:
        fast.add_special_tokens({"additional_special_tokens": rest})
    return fast


def _qwen_ids(tok) -> dict[str, int]:
    conv = tok.convert_tokens_to_ids
    return {"image_token_id": conv("<|image_pad|>"), "video_token_id": conv("<|video_pad|>"),
            "vision_start_token_id": conv("<|vision_start|>"), "vision_end_token_id": conv("<|vision_end|>")}


_TEXT_COMMON = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=2,
                    num_key_value_heads=1, max_position_embeddings=1024, rms_norm_eps=1e-6,
                    hidden_act="silu", tie_word_embeddings=False)


def _qwen_pixels(patch: int) -> dict[str, int]:
    unit = (patch * 2) ** 2  # one merged token
    return {"shortest_edge": unit * 4, "longest_edge": unit * 16}


#: vision towers of the tiny Qwen2-VL / Qwen2.5-VL models
QWEN2_TINY_VISION: dict[str, Any] = dict(depth=1, embed_dim=32, hidden_size=32, num_heads=2, mlp_ratio=2)
QWEN25_TINY_VISION: dict[str, Any] = dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=2,
                                          out_hidden_size=32, window_size=56, fullatt_block_indexes=[1])


def qwen2_vl_config(tok, text: dict[str, Any], vision: dict[str, Any], *, qwen25: bool) -> tuple[Any, type]:
    """``(config, model class)`` of a Qwen2-VL (or Qwen2.5-VL) model of the given shapes around ``tok``.

    ``text`` and ``vision`` hold the sizes (``text`` with its ``rope_parameters`` and, optionally,
    ``tie_word_embeddings``); the tokenizer's special ids, patch 14 / merge 2 / temporal 2 and
    Qwen2.5-VL's SiLU vision MLP are filled in here. Used by the tiny models and by
    ``mke-plugins scale`` for the published sizes.
    """
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
    )

    text = dict(text, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id)
    vision = dict(vision, patch_size=14, spatial_merge_size=2, temporal_patch_size=2)
    tie = text.setdefault("tie_word_embeddings", False)
    if qwen25:
        cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(vision, hidden_act="silu"),
                               tie_word_embeddings=tie, **_qwen_ids(tok))
        return cfg, Qwen2_5_VLForConditionalGeneration
    return Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **_qwen_ids(tok)), \
        Qwen2VLForConditionalGeneration


def _build_qwen2(tok, qwen25: bool):
    text = dict(_TEXT_COMMON, vocab_size=round64(len(tok)),
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    cfg, cls = qwen2_vl_config(tok, text, QWEN25_TINY_VISION if qwen25 else QWEN2_TINY_VISION, qwen25=qwen25)
    return cls(cfg)


def _build_qwen3(tok):
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    ids = _qwen_ids(tok)
    vocab = round64(len(tok))
    text = dict(_TEXT_COMMON, vocab_size=vocab, head_dim=16, eos_token_id=tok.eos_token_id,
                pad_token_id=tok.pad_token_id, bos_token_id=tok.eos_token_id,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3],
                                 "mrope_interleaved": True})
    vision = dict(depth=2, hidden_size=32, intermediate_size=32, num_heads=2, out_hidden_size=32, patch_size=16,
                  spatial_merge_size=2, temporal_patch_size=2, num_position_embeddings=16,
                  deepstack_visual_indexes=[0], hidden_act="gelu_pytorch_tanh")
    cfg = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **ids)
    return Qwen3VLForConditionalGeneration(cfg)


def _build_llava(tok):
    from transformers import LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration

    vocab = round64(len(tok))
    text = dict(_TEXT_COMMON, vocab_size=vocab, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                model_type="qwen2")
    vision = dict(hidden_size=32, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                  image_size=28, patch_size=14, model_type="siglip_vision_model")
    cfg = LlavaOnevisionConfig(text_config=text, vision_config=vision,
                               image_token_index=tok.convert_tokens_to_ids("<image>"),
                               video_token_index=tok.convert_tokens_to_ids("<video>"),
                               vision_feature_select_strategy="full", vision_feature_layer=-1,
                               image_grid_pinpoints=[[28, 28]], vision_aspect_ratio="anyres_max_1",
                               tie_word_embeddings=False)
    return LlavaOnevisionForConditionalGeneration(cfg)


# -- processors --------------------------------------------------------------------------

def _image_processor(family: str):
    if family == "llava-onevision":
        from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
            LlavaOnevisionImageProcessorPil,
        )

        return LlavaOnevisionImageProcessorPil(size={"height": 28, "width": 28}, crop_size={"height": 28, "width": 28},
                                               image_grid_pinpoints=[[28, 28]], do_pad=True)
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    patch = 16 if family == "qwen3-vl" else 14
    return Qwen2VLImageProcessorPil(size=_qwen_pixels(patch), patch_size=patch, temporal_patch_size=2, merge_size=2)


def _video_config(family: str) -> dict[str, Any]:
    """The video processor config a torchvision-equipped host loads with ``AutoProcessor``."""
    if family == "llava-onevision":
        return {"video_processor_type": "LlavaOnevisionVideoProcessor", "size": {"height": 28, "width": 28},
                "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
                "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5], "resample": 3}
    patch = 16 if family == "qwen3-vl" else 14
    kind = "Qwen3VLVideoProcessor" if family == "qwen3-vl" else "Qwen2VLVideoProcessor"
    return {"video_processor_type": kind, "size": _qwen_pixels(patch), "patch_size": patch,
            "temporal_patch_size": 2, "merge_size": 2, "do_resize": True, "do_rescale": True,
            "do_normalize": True, "do_convert_rgb": True, "do_sample_frames": False,
            "image_mean": [0.48145466, 0.4578275, 0.40821073], "image_std": [0.26862954, 0.26130258, 0.27577711]}


def _processor_class(family: str):
    if family == "llava-onevision":
        from transformers import LlavaOnevisionProcessor
        return LlavaOnevisionProcessor
    if family == "qwen3-vl":
        from transformers import Qwen3VLProcessor
        return Qwen3VLProcessor
    if family == "qwen2.5-vl":
        from transformers import Qwen2_5_VLProcessor
        return Qwen2_5_VLProcessor
    from transformers import Qwen2VLProcessor
    return Qwen2VLProcessor


def _processor_kwargs(family: str) -> dict[str, Any]:
    if family == "llava-onevision":
        return {"num_image_tokens": 4, "vision_feature_select_strategy": "full", "vision_aspect_ratio": "anyres_max_1"}
    return {}


def _make_processor(family: str, tok):
    from transformers.video_processing_utils import BaseVideoProcessor

    from mke_plugins.adapters.processors import video_stand_in_allowed

    cls = _processor_class(family)
    template = LLAVA_CHAT_TEMPLATE if family == "llava-onevision" else QWEN_CHAT_TEMPLATE
    with video_stand_in_allowed():
        return cls(image_processor=_image_processor(family), tokenizer=tok, video_processor=BaseVideoProcessor(),
                   chat_template=template, **_processor_kwargs(family))


def _write_processor_configs(out: Path, family: str) -> None:
    """Store the real video processor config (the in-process build used a stand-in) and a flat image config.

    transformers 5 nests sub-processor configs in ``processor_config.json``; older 5.x loaders
    also read ``preprocessor_config.json`` / ``video_preprocessor_config.json``. Both are written.
    """
    cfg_path = out / "processor_config.json"
    cfg = json.loads(cfg_path.read_text())
    video = _video_config(family)
    cfg["video_processor"] = video
    cfg_path.write_text(json.dumps(cfg, indent=2))
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2))
    image = dict(cfg.get("image_processor", {}))
    image.setdefault("processor_class", cfg.get("processor_class"))
    (out / "preprocessor_config.json").write_text(json.dumps(image, indent=2))


def family_of_dir(path: str | Path) -> str:
    """The tiny family a directory holds, from its saved ``mke_tiny.json`` marker."""
    meta = Path(path) / "mke_tiny.json"
    if not meta.exists():
        raise FileNotFoundError(f"{path} is not a tiny model directory (no mke_tiny.json); build it with build_tiny()")
    return json.loads(meta.read_text())["family"]


def build_tiny(family: str, root: str | Path) -> Path:
    """Build (once per ``root``) the tiny ``family`` model and processor; return its directory."""
    if family in ("blip2", "minigpt4"):
        raise ValueError(f"{family!r} tiny models are in-memory; use mke_plugins.testing.tiny_lavis.build_tiny_lavis")
    if family not in TINY_DIRS:
        raise ValueError(f"unknown tiny family {family!r}; choose one of {sorted(TINY_DIRS)}")
    out = Path(root) / TINY_DIRS[family]
    with _LOCK:
        if (out / "mke_tiny.json").exists():
            return out
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(SEED)
        if family == "llava-onevision":
            tok = train_tokenizer(LLAVA_SPECIALS, extra_tokens={"image_token": "<image>", "video_token": "<video>"})
        else:
            tok = train_tokenizer(QWEN_SPECIALS, extra_tokens={"image_token": "<|image_pad|>",
                                                               "video_token": "<|video_pad|>"})
        torch.manual_seed(SEED)
        if family == "llava-onevision":
            model = _build_llava(tok)
        elif family == "qwen3-vl":
            model = _build_qwen3(tok)
        else:
            model = _build_qwen2(tok, qwen25=(family == "qwen2.5-vl"))
        model.eval()
        model.save_pretrained(out)
        proc = _make_processor(family, tok)
        proc.save_pretrained(out)
        _write_processor_configs(out, family)
        (out / "chat_template.jinja").write_text(proc.chat_template)
        (out / "mke_tiny.json").write_text(json.dumps({"family": family, "seed": SEED}))
        return out


def load_tiny(path: str | Path, dtype: torch.dtype = torch.float32) -> tuple[torch.nn.Module, Any]:
    """Load a tiny model and its processor (works without torchvision)."""
    from transformers import AutoModelForImageTextToText

    from mke_plugins.adapters.processors import load_processor

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype)
    model.eval()
    return model, load_processor(path)
