"""The synthetic multimodal world and its bundled tiny Qwen2-VL model (see ``README.md`` here).

Public API:

- :func:`model_path` / :func:`load`: the bundled world model directory and ``(model, processor)``,
  loaded offline and without torchvision;
- :func:`build`: write a world's ``edit.json``, ``train.json``, ``world.json`` and PNGs;
- :func:`data_dir`: the default world (the one the bundled model was trained on), built into a
  cache directory on first use (``$MKE_WORLD_CACHE`` or ``~/.cache/mke-plugins/world``);
- :func:`records` / :func:`record_paths`: EasyEdit-style request dicts of a split, with images
  as qwen2-vl-native ``[PIL.Image]`` lists or as absolute paths (to build other families' images).

Importing this package does not import torch.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from .build import FORMAT_VERSION, build
from .spec import DEFAULT_LAYOUT, DEFAULT_SEED, LAYOUTS

__all__ = ["build", "data_dir", "load", "load_image", "locality_pool", "model_path", "record_paths", "records",
           "DEFAULT_SEED", "LAYOUTS", "SPLITS"]

MODEL_DIRNAME = "world-qwen2-vl"
#: the bundled model of each layout (directory names carry EasyEdit's ``qwen2-vl`` marker)
MODEL_DIRNAMES = {"single": MODEL_DIRNAME, "lifelong": "world-lifelong-qwen2-vl"}
#: the record files a built world can have (``dev`` only in the lifelong layout)
SPLITS = ("edit", "train", "dev")


def model_path(layout: str = DEFAULT_LAYOUT) -> Path:
    """The bundled world model's directory for ``layout`` (default: the single-edit world's)."""
    if layout not in MODEL_DIRNAMES:
        raise ValueError(f"unknown world layout {layout!r}; known: {sorted(MODEL_DIRNAMES)}")
    return Path(__file__).resolve().parent / "model" / MODEL_DIRNAMES[layout]


def load(path: str | Path | None = None, device: Any = "cpu", dtype: Any = None):
    """``(model, processor)`` of the bundled world model (or the one at ``path``), in eval mode.

    Loaded like any saved VLM (:func:`mke_plugins.adapters.loading.load_vlm`), after checking the
    world processor's files are there.
    """
    from mke_plugins.adapters.loading import load_vlm

    from .modeling import check_processor_files

    path = Path(path) if path is not None else model_path()
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"no world model at {path} (config.json missing); train one with "
                                "`mke-plugins world train --out DIR`")
    check_processor_files(path)
    model, processor = load_vlm(path, device, dtype or "float32", what=f"world model {path}")
    processor.tokenizer.padding_side = "left"
    return model, processor


def _cache_root() -> Path:
    env = os.environ.get("MKE_WORLD_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "mke-plugins" / "world"


def data_dir(seed: int = DEFAULT_SEED, root: str | Path | None = None, layout: str = DEFAULT_LAYOUT) -> Path:
    """A built world directory for ``seed`` and ``layout`` (default: the bundled model's world).

    Built once into ``root`` (default: the cache) and reused; the build is atomic, so concurrent
    callers never see a half-written world.
    """
    if layout not in LAYOUTS:
        raise ValueError(f"unknown world layout {layout!r}; known: {sorted(LAYOUTS)}")
    base = Path(root) if root is not None else _cache_root()
    prefix = "" if layout == DEFAULT_LAYOUT else f"{layout}-"
    out = base / f"{prefix}seed{seed}-v{FORMAT_VERSION}"
    if (out / "world.json").exists():
        return out
    base.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".seed{seed}-", dir=base))
    try:
        build(tmp, seed=seed, layout=layout)
        try:
            tmp.rename(out)
        except OSError:  # another process won the race
            if not (out / "world.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


def lifelong_model_path() -> Path:
    """The lifelong world's bundled model (``@lifelong-model`` in hyperparameters)."""
    return model_path("lifelong")


def lifelong_data_dir() -> Path:
    """The lifelong world's data, built on first use (``@lifelong-data`` in hyperparameters)."""
    return data_dir(layout="lifelong")


def _resolve_dir(root: str | Path | None) -> Path:
    return Path(root) if root is not None else data_dir()


#: record fields :func:`record_paths` reads; any other field is passed through unchanged
_READ_KEYS = frozenset(("case_id", "src", "alt", "pred", "image", "rephrase", "image_rephrase", "loc", "loc_ans",
                        "m_loc", "m_loc_q", "m_loc_a", "text_only_prompt", "image_only_prompt", "portability",
                        "fine_locality", "entity", "relation"))


def record_paths(split: str = "edit", root: str | Path | None = None) -> list[dict[str, Any]]:
    """EasyEdit-style request dicts of ``split`` (``edit``, ``train`` or, in the lifelong layout,
    ``dev``) with absolute image paths.

    ``root`` is a directory written by :func:`build` (default: :func:`data_dir`). Text-only
    entries of ``portability`` / ``fine_locality`` have ``image: None``. Record fields not read
    here (the probes' fact identities ``loc_fact`` / ``m_loc_fact``, ...) are passed through as they are.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    d = _resolve_dir(root)
    f = d / f"{split}.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing; build the world with `mke-plugins world build --out {d}`")
    raw = json.loads(f.read_text())

    def p(rel: str | None) -> str | None:
        return None if rel is None else str(d / rel)

    out = []
    for r in raw:
        out.append({
            "case_id": r["case_id"], "prompt": r["src"], "target": r["alt"], "pred": r["pred"],
            "image": p(r["image"]), "rephrase_prompt": r["rephrase"],
            "image_rephrase": p(r["image_rephrase"]),
            "locality_prompt": r["loc"], "locality_ground_truth": r["loc_ans"],
            "multimodal_locality_image": p(r["m_loc"]),
            "multimodal_locality_prompt": r["m_loc_q"],
            "multimodal_locality_ground_truth": r["m_loc_a"],
            "text_only_prompt": r["text_only_prompt"], "image_only_prompt": r["image_only_prompt"],
            "portability": [dict(x, image=p(x.get("image"))) for x in r["portability"]],
            "fine_locality": [dict(x, image=p(x.get("image"))) for x in r["fine_locality"]],
            "file_type": "image", "entity": r["entity"], "relation": r["relation"],
        })
        out[-1].update((k, v) for k, v in r.items() if k not in _READ_KEYS)  # newer fields (loc_fact, ...)
    return out


def locality_pool(root: str | Path | None = None) -> list[dict[str, Any]]:
    """The lifelong world's locality pool (``locality.json``) with absolute image paths: every
    fact of the entities that no edit, train or development record touches, in the paired,
    text-only and image-only forms."""
    d = _resolve_dir(root)
    f = d / "locality.json"
    if not f.exists():
        raise FileNotFoundError(f"{f} is missing: only the lifelong layout has a locality pool "
                                f"(`mke-plugins world build --layout lifelong --out DIR`)")
    return [dict(x, image=None if x.get("image") is None else str(d / x["image"]))
            for x in json.loads(f.read_text())]


def load_image(path: str | Path):
    """A world picture as a PIL RGB image."""
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def records(split: str = "edit", root: str | Path | None = None) -> list[dict[str, Any]]:
    """Like :func:`record_paths`, with every image a qwen2-vl-native list of one PIL RGB image."""
    cache: dict[str, Any] = {}

    def img(path: str | None):
        if path is None:
            return None
        if path not in cache:
            cache[path] = load_image(path)
        return [cache[path]]

    out = []
    for r in record_paths(split, root):
        r = dict(r)
        for key in ("image", "image_rephrase", "multimodal_locality_image"):
            r[key] = img(r[key])
        r["portability"] = [dict(x, image=img(x["image"])) for x in r["portability"]]
        r["fine_locality"] = [dict(x, image=img(x["image"])) for x in r["fine_locality"]]
        out.append(r)
    return out
