"""The world model's parts: word-level tokenizer, processor, tiny Qwen2-VL config; loading.

The tokenizer is a ``tokenizers`` ``WordLevel`` model over the world's vocabulary plus Qwen's
special tokens, so every answer is exactly one token. The processor is a real
``Qwen2VLProcessor`` (image processor sized so a 56x56 picture gives 4 image tokens), saved with
an image *and* a video processor config so EasyEdit's ``AutoProcessor.from_pretrained`` loads
the directory unchanged. :func:`load_processor` builds the same processor without torchvision
(the video processor is a stand-in; the world has no videos).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

QWEN_SPECIALS = ("<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>",
                 "<|vision_end|>", "<|image_pad|>", "<|video_pad|>")
UNK = "[UNK]"

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for part in message['content'] %}"
    "{% if part['type'] == 'image' %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif part['type'] == 'video' %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif part['type'] == 'text' %}{{ part['text'] }}"
    "{% endif %}{% endfor %}{% endif %}<|im_end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

IMAGE_PIXELS = 56 * 56  # min = max: every picture becomes 56x56 = 4 merged tokens

#: the tiny architecture (README, "What the world shows": larger ones learn the pictures worse)
TEXT_CONFIG: dict[str, Any] = dict(
    hidden_size=128, intermediate_size=256, num_hidden_layers=4, num_attention_heads=4,
    num_key_value_heads=4, max_position_embeddings=512, rms_norm_eps=1e-6,
    rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [4, 6, 6]},
)
VISION_CONFIG: dict[str, Any] = dict(
    depth=2, embed_dim=64, hidden_size=128, num_heads=4, mlp_ratio=4, patch_size=14,
    spatial_merge_size=2, temporal_patch_size=2, in_channels=3,
)


def build_tokenizer(vocabulary: list[str]):
    """A fast word-level tokenizer: whitespace split, punctuation isolated, Qwen specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = [UNK] + [w for w in vocabulary if w not in QWEN_SPECIALS and w != UNK]
    vocab = {w: i for i, w in enumerate(list(QWEN_SPECIALS) + words)}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation("isolated")])
    core.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    core.add_special_tokens(list(QWEN_SPECIALS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token=UNK, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        padding_side="left", model_max_length=512,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


def build_image_processor():
    from transformers.models.qwen2_vl import image_processing_pil_qwen2_vl as pil

    return pil.Qwen2VLImageProcessorPil(min_pixels=IMAGE_PIXELS, max_pixels=IMAGE_PIXELS,
                                        patch_size=14, temporal_patch_size=2, merge_size=2)


def _video_stand_in():
    from transformers.video_processing_utils import BaseVideoProcessor

    return BaseVideoProcessor()


def build_processor(tokenizer):
    """A ``Qwen2VLProcessor`` around ``tokenizer`` (torchvision-free; video is a stand-in)."""
    from transformers import Qwen2VLProcessor

    from mke_plugins.adapters.processors import video_stand_in_allowed

    with video_stand_in_allowed():
        return Qwen2VLProcessor(image_processor=build_image_processor(), tokenizer=tokenizer,
                                video_processor=_video_stand_in(), chat_template=CHAT_TEMPLATE)


def build_config(tokenizer, n_layers: int | None = None):
    """The tiny ``Qwen2VLConfig`` for ``tokenizer`` (vocabulary rounded up to a multiple of 64);
    ``n_layers`` overrides the decoder depth of ``TEXT_CONFIG`` (world variants)."""
    from transformers import Qwen2VLConfig

    n = len(tokenizer)
    vocab_size = (n + 63) // 64 * 64
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in QWEN_SPECIALS}
    depth = TEXT_CONFIG["num_hidden_layers"] if n_layers is None else n_layers
    text = dict(TEXT_CONFIG, num_hidden_layers=depth, vocab_size=vocab_size, bos_token_id=ids["<|endoftext|>"],
                eos_token_id=ids["<|im_end|>"], pad_token_id=ids["<|endoftext|>"],
                tie_word_embeddings=False)
    return Qwen2VLConfig(
        text_config=text, vision_config=dict(VISION_CONFIG),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        bos_token_id=ids["<|endoftext|>"], eos_token_id=ids["<|im_end|>"],
        pad_token_id=ids["<|endoftext|>"], tie_word_embeddings=False,
    )


def save_processor(processor, out: Path) -> None:
    """Save tokenizer, chat template, image processor and a real video processor config."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    processor.tokenizer.save_pretrained(out)
    processor.image_processor.save_pretrained(out)
    ip = json.loads((out / "preprocessor_config.json").read_text())
    ip["image_processor_type"] = "Qwen2VLImageProcessor"  # torchvision or PIL backend, as available
    ip["processor_class"] = "Qwen2VLProcessor"
    (out / "preprocessor_config.json").write_text(json.dumps(ip, indent=2, sort_keys=True) + "\n")
    video = {
        "video_processor_type": "Qwen2VLVideoProcessor", "processor_class": "Qwen2VLProcessor",
        "min_pixels": IMAGE_PIXELS, "max_pixels": IMAGE_PIXELS,
        "size": {"shortest_edge": IMAGE_PIXELS, "longest_edge": IMAGE_PIXELS},
        "patch_size": 14, "temporal_patch_size": 2, "merge_size": 2,
        "image_mean": ip.get("image_mean"), "image_std": ip.get("image_std"),
        "do_resize": True, "do_rescale": True, "do_normalize": True, "do_convert_rgb": True,
        "rescale_factor": ip.get("rescale_factor", 1 / 255),
    }
    (out / "video_preprocessor_config.json").write_text(json.dumps(video, indent=2, sort_keys=True) + "\n")
    (out / "chat_template.jinja").write_text(CHAT_TEMPLATE)
    (out / "processor_config.json").write_text(
        json.dumps({"processor_class": "Qwen2VLProcessor"}, indent=2) + "\n")
    # tokenizer_config may carry the template too; keep one source of truth: the .jinja file
    tc_path = out / "tokenizer_config.json"
    tc = json.loads(tc_path.read_text())
    tc.pop("chat_template", None)
    tc["processor_class"] = "Qwen2VLProcessor"
    tc_path.write_text(json.dumps(tc, indent=2, sort_keys=True) + "\n")


def check_processor_files(path: str | Path) -> None:
    """The world processor's files are in ``path`` (else the error says how to rebuild them)."""
    path = Path(path)
    for name in ("tokenizer.json", "preprocessor_config.json", "chat_template.jinja"):
        if not (path / name).exists():
            raise FileNotFoundError(f"world processor file {path / name} is missing; rebuild the "
                                    "model with `mke-plugins world train`")


def load_processor(path: str | Path):
    """Load the world processor from ``path`` without network and without torchvision."""
    from mke_plugins.adapters.processors import load_processor as adapters_load

    check_processor_files(path)
    proc = adapters_load(str(path))
    proc.tokenizer.padding_side = "left"
    return proc
