"""Edit cases for the bench: benchmark records as request dicts with family-native images.

The bench runs on the bundled world by default, or on any benchmark file or folder (``--data``)
in one of the formats of :mod:`.formats` (``--format``: the world's MMEdit-style JSON, MMEdit
E-VQA / E-IC, VLKEB, MMKE-Bench, ComprehendEdit; ``auto`` detects it from the first record).
This module holds the world's reader and what every format shares. The world's reader maps the
record fields of ``hooks/EASYEDIT-NOTES.md`` ("MMEdit datasets") to EasyEdit's request keys
(``src`` -> ``prompt``, ``alt`` -> ``target``, ``loc`` -> ``locality_prompt``, ...), keeps the
optional extensions (``text_only_prompt``, ``image_only_prompt``, ``portability``,
``fine_locality``) when present, and treats empty strings as absent, as EasyEdit's loaders do.
Image paths are relative to the image root (``--image-root``, EasyEdit's ``coco_image``; by
default the JSON file's folder); ``image_rephrase`` to ``--rephrase-image-root`` when given.
Every image becomes the family-native object the method and the scorer expect
(:func:`mke_plugins.adapters.images.image_for_family`).

Every record, picture and text field is checked before the first edit (:func:`load_data`,
:func:`with_images`, :func:`check_text`): a bad record stops the run at once, naming the file,
the record index and the benchmark's own field name, never half-way through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from mke_hooks import MKEError
from mke_hooks.errors import RequestError

from .formats.common import absent

#: MMEdit record field -> EasyEdit request key (text fields)
TEXT_FIELDS = {
    "src": "prompt", "alt": "target", "pred": "pred", "rephrase": "rephrase_prompt",
    "loc": "locality_prompt", "loc_ans": "locality_ground_truth",
    "m_loc_q": "multimodal_locality_prompt", "m_loc_a": "multimodal_locality_ground_truth",
    "text_only_prompt": "text_only_prompt", "image_only_prompt": "image_only_prompt",
}
#: MMEdit record field -> EasyEdit request key (image paths)
IMAGE_FIELDS = {"image": "image", "image_rephrase": "image_rephrase", "m_loc": "multimodal_locality_image"}
#: EasyEdit request key -> MMEdit record field, to name the field of the record in errors
RECORD_FIELD = {dst: src for src, dst in {**TEXT_FIELDS, **IMAGE_FIELDS}.items()}
PROBE_LISTS = ("portability", "fine_locality")
#: record fields copied as they are: the case id and the facts the edit and its probes ask (``entity`` and
#: ``relation`` of the edit; ``loc_fact`` / ``m_loc_fact`` of the T-Loc / M-Loc probe)
PASSTHROUGH = ("case_id", "entity", "relation", "loc_fact", "m_loc_fact")


def find_json(data: str | Path) -> Path:
    """The records file: ``data`` itself, or ``data/edit.json`` (a world folder), or a folder's only JSON."""
    p = Path(data)
    if p.is_file():
        return p
    if not p.is_dir():
        raise MKEError(f"--data {data}: no such file or folder; pass an MMEdit JSON file or a folder holding "
                       f"edit.json")
    if (p / "edit.json").is_file():
        return p / "edit.json"
    found = sorted(x for x in p.glob("*.json") if x.name not in ("world.json", "train.json"))
    if len(found) == 1:
        return found[0]
    raise MKEError(f"--data {data}: expected edit.json or exactly one records JSON in the folder, found "
                   f"{[x.name for x in found] or 'none'}; pass the JSON file itself")


def record_to_request(record: dict[str, Any], image_root: Path, index: int, *,
                      rephrase_root: Path | None = None) -> dict[str, Any]:
    """One MMEdit record as an EasyEdit request dict, images still as absolute paths.

    ``image_rephrase`` is under ``rephrase_root`` when given, every other picture under ``image_root``.
    """
    if not isinstance(record, dict):
        raise MKEError(f"record {index}: expected a JSON object with src, alt and image, got "
                       f"{type(record).__name__} {json.dumps(record)[:40]}")
    for key in ("src", "alt", "image"):
        if absent(record.get(key)):
            raise MKEError(f"record {index}: field {key!r} is missing or empty (MMEdit records need src, alt "
                           f"and image)")
        if isinstance(record[key], str) and not record[key].strip():
            raise MKEError(f"record {index}: field {key!r} is blank ({record[key]!r}); write the text")
    req: dict[str, Any] = {"file_type": "image"}
    for src, dst in TEXT_FIELDS.items():
        if not absent(record.get(src)):
            req[dst] = str(record[src])
    for src, dst in IMAGE_FIELDS.items():
        if not absent(record.get(src)):
            if not isinstance(record[src], str):
                raise MKEError(f"record {index}: field {src!r} must be an image path, got "
                               f"{type(record[src]).__name__} {json.dumps(record[src])[:40]}")
            root = rephrase_root if src == "image_rephrase" and rephrase_root is not None else image_root
            req[dst] = str(root / record[src])
    for key in PROBE_LISTS:
        items = record.get(key)
        if absent(items):
            continue
        if isinstance(items, dict):
            items = [items]
        out = []
        for j, item in enumerate(items):
            if not isinstance(item, dict) or absent(item.get("prompt")) or absent(item.get("answer")):
                raise MKEError(f"record {index}: {key}[{j}] needs non-empty 'prompt' and 'answer'")
            if not absent(item.get("image")) and not isinstance(item["image"], str):
                raise MKEError(f"record {index}: {key}[{j}].image must be an image path, got "
                               f"{type(item['image']).__name__}")
            item = dict(item)
            item["image"] = None if absent(item.get("image")) else str(image_root / item["image"])
            out.append(item)
        req[key] = out
    for key in PASSTHROUGH:
        if key in record:
            req[key] = record[key]
    req.setdefault("case_id", index)
    # a request without the multimodal-locality image cannot have that probe
    if "multimodal_locality_image" not in req:
        req.pop("multimodal_locality_prompt", None)
        req.pop("multimodal_locality_ground_truth", None)
    if "locality_ground_truth" not in req:
        req.pop("locality_prompt", None)
    return req


def load_data(data: str | Path, *, cases: int | None = None, image_root: str | Path | None = None,
              rephrase_image_root: str | Path | None = None, fmt: str = "auto", hparams: Any = ()) -> Any:
    """The first ``cases`` records of ``data`` read by the loader of ``fmt`` (a :class:`.formats.Dataset`).

    ``hparams``: the bound methods' hparams, whose ``coco_image`` / ``rephrase_image`` are the
    EasyEdit-style formats' image roots when the flags are not given.
    """
    from .formats import load_dataset, read_json

    path = find_json(data)
    raw = read_json(path)
    if cases is not None:
        if cases < 1:
            raise MKEError(f"--cases must be at least 1, got {cases}")
        raw = raw[:cases]  # before skipping, as EasyEdit's `size`
    return load_dataset(path, raw, fmt=fmt, image_root=None if image_root is None else str(image_root),
                        rephrase_image_root=None if rephrase_image_root is None else str(rephrase_image_root),
                        hparams=hparams)


def load_requests(data: str | Path, *, cases: int | None = None, image_root: str | Path | None = None,
                  rephrase_image_root: str | Path | None = None, fmt: str = "auto",
                  hparams: Any = ()) -> tuple[Path, list[dict[str, Any]]]:
    """``(json_path, requests)``: :func:`load_data`'s requests, image paths not yet loaded."""
    ds = load_data(data, cases=cases, image_root=image_root, rephrase_image_root=rephrase_image_root, fmt=fmt,
                   hparams=hparams)
    return ds.path, ds.requests


class ImageCache:
    """Loads each picture once per family and hands out the family-native object."""

    def __init__(self, adapter: Any) -> None:
        self.adapter = adapter
        self._cache: dict[str, Any] = {}

    def __call__(self, path: str | None, where: str = "") -> Any:
        """The image at ``path``; ``where`` (``record 3, field 'image'``) prefixes errors."""
        if path is None:
            return None
        if path not in self._cache:
            from mke_plugins.adapters.images import image_for_family

            where = f"{where}: " if where else ""
            if not Path(path).is_file():
                raise MKEError(f"{where}image {path} not found; check --data and --image-root")
            try:
                self._cache[path] = image_for_family(self.adapter, path)
            except (OSError, SyntaxError, ValueError) as exc:  # PIL: truncated, not an image, bad size
                raise MKEError(f"{where}{path} is not a readable image ({exc}); replace the file or fix "
                               f"the path") from None
        return self._cache[path]


def with_images(requests: list[dict[str, Any]], adapter: Any, dataset: Any = None) -> list[dict[str, Any]]:
    """Copies of ``requests`` whose image paths are replaced by family-native images (all loaded now).

    ``dataset`` (a :class:`.formats.Dataset`) names the benchmark's record index and field in errors.
    """
    load = ImageCache(adapter)

    def where(i: int, key: str) -> str:
        if dataset is not None:
            return dataset.where(i, key)
        return f"record {i}, field {RECORD_FIELD.get(key, key)!r}"

    out = []
    for i, r in enumerate(requests):
        r = dict(r)
        for key in IMAGE_FIELDS.values():
            if key in r:
                r[key] = load(r[key], where(i, key))
        for key in PROBE_LISTS:
            if key in r:
                r[key] = [dict(item, image=load(item.get("image"), where(i, f"{key}[{j}].image")))
                          for j, item in enumerate(r[key])]
        out.append(r)
    return out


def check_text(requests: list[dict[str, Any]], tok: Any, model: Any, path: str | Path,
               dataset: Any = None) -> None:
    """Every record's text is spelled by the tokenizer and fits the model's context.

    :func:`mke_plugins.core.requests.check_tokens` on all requests at once, its error told in the
    records' terms (``edit.json: record 3, field 'alt': ...``); ``dataset`` (a
    :class:`.formats.Dataset`) names the benchmark's record index and field.
    """
    from mke_plugins.core.requests import check_tokens

    try:
        check_tokens(requests, tok, model)
    except RequestError as err:
        if dataset is not None:
            where = dataset.where(err.index, err.field)
        else:
            where = f"record {err.index}, field {RECORD_FIELD.get(err.field, err.field)!r}"
        raise MKEError(f"{path}: {where}: {str(err).split(': ', 1)[-1]}") from None
