"""Load a VLM from a folder and seed every generator: what each driver does before it edits or trains.

The bench, ``mke-plugins scale`` and every method's offline stage (``mke-plugins train METHOD``)
used to carry their own copy of both; one copy keeps the errors and the seeding the same
everywhere. :func:`check_model_dir` checks a folder before transformers reads it, so a wrong path
fails with the fix, not with a transformers traceback. The bundled world model is an ordinary
Hugging Face folder (``mke_plugins.world.model_path()``), so it loads through :func:`load_vlm` too.
With ``device_map`` a model bigger than one GPU loads across the node's GPUs; offloaded weights are
refused (:mod:`.placement` says why).
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Any

from mke_hooks import MKEError

#: file names that hold a saved model's weights (transformers' single-file and sharded layouts)
WEIGHT_PATTERNS = ("*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin", "pytorch_model.bin.index.json")
#: EasyEdit's LAVIS wrappers: built by EasyEdit from a checkpoint, never loaded from a folder
LAVIS_NAMES = ("blip2", "minigpt4")


def seed_all(seed: int) -> None:
    """Seed Python's, NumPy's and torch's global generators (torch seeds every CUDA device too)."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _read_config(config: Path, what: str) -> dict[str, Any]:
    text = config.read_text(errors="replace")
    try:
        data = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as exc:
        raise MKEError(f"{what}: config.json is not valid JSON ({exc}); save the model again "
                       f"with save_pretrained") from None
    if not isinstance(data, dict) or not data:
        raise MKEError(f"{what}: config.json is empty; save the model again with save_pretrained")
    return data


def check_model_dir(path: str | os.PathLike[str], what: str = "") -> Path:
    """A saved Hugging Face model folder: a readable ``config.json`` with a ``model_type``, and weights.

    ``what`` names where the path came from in errors (default ``--model PATH``).
    """
    p = Path(path)
    what = what or f"--model {path}"
    if str(path).strip().lower() in LAVIS_NAMES:
        raise MKEError(f"{what}: {path} is one of EasyEdit's LAVIS wrappers, which EasyEdit builds from its "
                       f"checkpoints and cannot be loaded by path; use EasyEdit's editor or MultimodalTrainer "
                       f"for it, or pass a saved Hugging Face model folder")
    config = p / "config.json"
    if not config.is_file():
        raise MKEError(f"{what}: no config.json there; pass a saved Hugging Face model directory "
                       f"(blip2/minigpt4 need EasyEdit's LAVIS wrappers and cannot be loaded by path)")
    if "model_type" not in _read_config(config, what):
        raise MKEError(f"{what}: config.json has no 'model_type', so transformers cannot tell the "
                       f"architecture; save the model again with save_pretrained")
    if not any(next(p.glob(pattern), None) for pattern in WEIGHT_PATTERNS):
        found = sorted(x.name for x in p.iterdir())
        raise MKEError(f"{what}: no weights there (model.safetensors, sharded model-*.safetensors "
                       f"with their index, or pytorch_model.bin); the folder holds {', '.join(found)}. "
                       f"Download the weights too, or save the model with save_pretrained")
    return p


def device_name(device: Any) -> str:
    """An hparams ``device`` as torch spells it: an int or a digit string is a CUDA index."""
    if isinstance(device, int) or str(device).isdigit():
        return f"cuda:{device}"
    return str(device)


def load_vlm(path: str | os.PathLike[str], device: Any = "cpu", dtype: Any = "float32", *,
             what: str = "", device_map: str | None = None, max_memory: Any = None) -> tuple[Any, Any]:
    """``(model, processor)`` of the Hugging Face VLM saved in ``path``, in eval mode on ``device``.

    Offline only (``local_files_only``); the processor loads without torchvision
    (:func:`~mke_plugins.adapters.processors.load_processor`). ``dtype`` is a torch dtype or its
    name (``"bfloat16"``). ``what`` names the path's origin in errors (``--model DIR``,
    ``model_name in x.yaml``).

    ``device_map`` (``"auto"``, ``"balanced"``, ...) spreads the model over the GPUs of this node
    through transformers and accelerate instead of moving it to ``device`` (on a machine without
    GPUs it loads on the CPU); ``max_memory`` (``{0: "20GiB", "cpu": "60GiB"}`` or the
    ``--max-memory`` text) caps each device. A model whose map offloads weights (``meta``) is
    refused, naming the first such weight (:func:`~mke_plugins.adapters.placement.refuse_offloaded`).
    """
    from transformers import AutoModelForImageTextToText

    from mke_plugins.hparams import to_dtype

    from .placement import check_device_map, parse_max_memory, refuse_offloaded
    from .processors import load_processor

    p = check_model_dir(path, what)
    what = what or f"--model {path}"
    device_map = check_device_map(device_map)
    memory = parse_max_memory(max_memory)
    if memory is not None and device_map is None:
        raise MKEError(f"{what}: --max-memory only applies with --device-map (e.g. --device-map auto)")
    kwargs: dict[str, Any] = {}
    if device_map is not None:
        kwargs["device_map"] = device_map
        if memory is not None:
            kwargs["max_memory"] = memory
    try:
        model = AutoModelForImageTextToText.from_pretrained(str(p), dtype=to_dtype(dtype), local_files_only=True,
                                                            **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise MKEError(f"{what}: transformers cannot load it: {str(exc).strip().splitlines()[0]}") from exc
    refuse_offloaded(model, what)
    if device_map is None:
        model.to(device_name(device))
    model.eval()
    return model, load_processor(p)
