"""Load an HF multimodal processor from a directory, with or without torchvision.

``AutoProcessor.from_pretrained`` needs torchvision for the video processors of Qwen-VL and
LLaVA-OneVision (transformers 5 refuses ``video_processor=None``). On a CPU-only machine without
torchvision we rebuild the same processor in process: the saved tokenizer, the PIL image
processor, a ``BaseVideoProcessor`` stand-in (images never touch it), the saved chat template and
the saved processor kwargs. Text and image inputs come out identical to what ``AutoProcessor``
builds where torchvision exists. Any code that loads a processor from a path (tiny models, the
world model, hparams-driven loaders) should use :func:`load_processor`.
"""

from __future__ import annotations

import contextlib
import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

_BY_MODEL_TYPE = {
    "qwen2_vl": "Qwen2VLProcessor",
    "qwen2_5_vl": "Qwen2_5_VLProcessor",
    "qwen3_vl": "Qwen3VLProcessor",
    "llava_onevision": "LlavaOnevisionProcessor",
}


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.exists() else {}


def _processor_class_name(path: Path) -> str:
    cfg = _read_json(path / "processor_config.json")
    name = cfg.get("processor_class")
    if name:
        return name
    for fname in ("preprocessor_config.json", "tokenizer_config.json"):
        name = _read_json(path / fname).get("processor_class")
        if name:
            return name
    model_type = _read_json(path / "config.json").get("model_type")
    if model_type in _BY_MODEL_TYPE:
        return _BY_MODEL_TYPE[model_type]
    raise ValueError(f"cannot tell which processor class {path} needs: no processor_class in processor_config.json "
                     f"and config.json model_type {model_type!r} is not one of {sorted(_BY_MODEL_TYPE)}")


@contextlib.contextmanager
def video_stand_in_allowed():
    """Let a processor accept ``BaseVideoProcessor`` while torchvision is missing.

    Without torchvision ``transformers.VideoProcessorMixin`` is not exported, so the processor's
    argument type check cannot resolve the class it wants for ``video_processor`` and fails. For
    the duration of the block the lookup resolves that name to the real class from
    ``transformers.video_processing_utils``; every other name resolves as before.
    """
    from transformers import processing_utils
    try:
        from transformers.video_processing_utils import VideoProcessorMixin
    except ImportError:  # older 5.x (EasyEdit pins 5.5.4): the check wants BaseVideoProcessor, no help needed
        yield
        return

    mixin = processing_utils.ProcessorMixin
    original = mixin.__dict__["get_possibly_dynamic_module"]

    def lookup(module_name):
        if module_name == "VideoProcessorMixin":
            return VideoProcessorMixin
        return original.__func__(module_name)

    mixin.get_possibly_dynamic_module = staticmethod(lookup)
    try:
        yield
    finally:
        mixin.get_possibly_dynamic_module = original


def build_processor_without_torchvision(path: str | Path):
    """Rebuild the directory's processor from its parts, using a stand-in video processor."""
    import transformers
    from transformers import AutoImageProcessor, AutoTokenizer
    from transformers.video_processing_utils import BaseVideoProcessor

    path = Path(path)
    cls_name = _processor_class_name(path)
    cls = getattr(transformers, cls_name, None)
    if cls is None:
        raise ValueError(f"{path}: processor class {cls_name!r} is not in this transformers version "
                         f"({transformers.__version__})")
    tok = AutoTokenizer.from_pretrained(str(path))
    image_processor = AutoImageProcessor.from_pretrained(str(path))
    template = None
    if (path / "chat_template.jinja").exists():
        template = (path / "chat_template.jinja").read_text()
    elif (path / "chat_template.json").exists():
        template = _read_json(path / "chat_template.json").get("chat_template")
    else:
        template = getattr(tok, "chat_template", None)
    cfg = _read_json(path / "processor_config.json")
    extra = {k: v for k, v in cfg.items()
             if k not in ("processor_class", "image_processor", "video_processor", "tokenizer", "chat_template")
             and not isinstance(v, dict)}
    with video_stand_in_allowed():
        return cls(image_processor=image_processor, tokenizer=tok, video_processor=BaseVideoProcessor(),
                   chat_template=template, **extra)


def load_processor(path: str | Path):
    """``AutoProcessor.from_pretrained(path)``, falling back to an in-process build without torchvision."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(str(path))
    except (ImportError, ValueError, TypeError, OSError, AttributeError) as err:
        if not Path(path).is_dir():
            raise
        log.info("AutoProcessor failed for %s (%s); building the processor in process", path, err)
        return build_processor_without_torchvision(path)
