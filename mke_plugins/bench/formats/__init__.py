"""The benchmarks users have, each read by one loader into the bench's request dicts.

Why it exists: a user holds our numbers against EasyEdit's on the benchmark they already have,
so each benchmark must reach the bench and the offline stages exactly as its own loader reads it.
``--format`` picks the loader (``auto``: detected from the first record, which must match exactly
one format; a plain MMEdit record is E-VQA when its ``src`` is a question, E-IC when it is a
caption prompt such as "a photo of"; VLKEB's ``eval.json``, without ``port_new``, reads as
E-VQA unless ``--format vlkeb`` is given). Formats:

========================  =====================================================================
``world``                 the world's MMEdit-style JSON with its extensions (:mod:`..data`)
``mmedit-vqa``            MMEdit E-VQA, as EasyEdit's ``VQADataset`` (:mod:`.mmedit`)
``mmedit-caption``        MMEdit E-IC, as EasyEdit's ``CaptionDataset`` (:mod:`.mmedit`)
``vlkeb``                 VLKEB's evaluation files with ``port_new`` (:mod:`.mmedit`)
``mmke``                  MMKE-Bench (:mod:`.mmke`)
``comprehendedit``        ComprehendEdit (:mod:`.comprehendedit`)
========================  =====================================================================

Image roots: ``--image-root`` (EasyEdit's ``coco_image``) and ``--rephrase-image-root``
(``rephrase_image``, for ``image_rephrase``); without either flag the EasyEdit-style formats use
the methods' hparams ``coco_image`` / ``rephrase_image`` when set, else the JSON's folder; the
rephrase root falls back to the image root. Every record is read and every named picture must
exist before anything is edited.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

from mke_hooks import MKEError

from . import comprehendedit, mmedit, mmke
from .common import Dataset, Roots, check_object, skipped_note

Loader = Callable[[Sequence[Any], Roots], tuple[list[dict[str, Any]], list[int], list[int]]]


@dataclass(frozen=True)
class Format:
    """One benchmark: how to recognise its records, how to read them, what its loader skips."""

    name: str
    title: str
    claims: Callable[[dict[str, Any]], bool]
    load: Loader
    record_fields: dict[str, str]
    hparams_roots: bool = True  # image roots from the methods' coco_image / rephrase_image
    skip_rule: str = ""


def _world_claims(record: dict[str, Any]) -> bool:
    if not all(k in record for k in ("src", "alt", "image")) or "port_new" in record or "knowledge_type" in record:
        return False
    extended = any(k in record for k in ("text_only_prompt", "image_only_prompt", "fine_locality", "portability"))
    return extended or not all(k in record for k in mmedit.MMEDIT_KEYS)


def _world_load(raw: Sequence[Any], roots: Roots) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    from ..data import record_to_request

    reqs = [record_to_request(r, roots.image, i, rephrase_root=roots.rephrase) for i, r in enumerate(raw)]
    return reqs, list(range(len(reqs))), []


def _world_fields() -> dict[str, str]:
    from ..data import RECORD_FIELD

    return dict(RECORD_FIELD)


FORMATS: dict[str, Format] = {f.name: f for f in (
    Format("world", "the world's MMEdit-style JSON", _world_claims, _world_load, {}, hparams_roots=False),
    Format("mmedit-vqa", "MMEdit E-VQA", mmedit.claims_vqa, mmedit.load_vqa, mmedit.RECORD_FIELDS,
           skip_rule="EasyEdit's VQADataset skips records with an empty alt or any other empty field"),
    Format("mmedit-caption", "MMEdit E-IC", mmedit.claims_caption, mmedit.load_caption, mmedit.RECORD_FIELDS,
           skip_rule="EasyEdit's CaptionDataset skips records with an empty alt"),
    Format("vlkeb", "VLKEB", mmedit.claims_vlkeb, mmedit.load_vlkeb, mmedit.RECORD_FIELDS,
           skip_rule="VLKEB's loader skips records with an empty alt"),
    Format("mmke", "MMKE-Bench", mmke.claims, mmke.load, {**mmedit.RECORD_FIELDS, **mmke.RECORD_FIELDS},
           skip_rule="MMKE-Bench's loader skips records with an empty alt"),
    Format("comprehendedit", "ComprehendEdit", comprehendedit.claims, comprehendedit.load,
           comprehendedit.RECORD_FIELDS, hparams_roots=False,
           skip_rule="EasyEdit's ComprehendEditDataset skips records with an empty answer"),
)}
FORMAT_CHOICES = ("auto", *FORMATS)


def detect(raw: Sequence[Any], path: Path) -> str:
    """The one format whose records look like ``raw[0]``; else an error naming the candidates."""
    first = check_object(raw[0], 0, "benchmark")
    found = [f.name for f in FORMATS.values() if f.claims(first)]
    if len(found) == 1:
        return found[0]
    if found:
        raise MKEError(f"{path}: record 0 fits several formats ({', '.join(found)}); pass --format with the one "
                       f"it is")
    raise MKEError(f"{path}: record 0 (fields {', '.join(sorted(first)) or 'none'}) fits no known format: "
                   f"MMEdit-style records need src, alt and image, ComprehendEdit records question, answer, image "
                   f"and multimodal_locality_prompt; pass --format ({', '.join(FORMATS)})")


def hparams_roots(hparams: Sequence[Any]) -> dict[str, tuple[str, str]]:
    """``{"coco_image": (root, "FT's hparams coco_image"), ...}``: the roots the methods' hparams set.

    Methods that set a root must agree on it, or the run could not read the same pictures for all.
    """
    out: dict[str, tuple[str, str]] = {}
    for key in ("coco_image", "rephrase_image"):
        seen = {}
        for hp in hparams:
            value = getattr(hp, key, None)
            if isinstance(value, str) and value:
                seen.setdefault(value, getattr(hp, "alg_name", "") or type(hp).__name__)
        if len(seen) > 1:
            listed = "; ".join(f"{name}: {value}" for value, name in seen.items())
            raise MKEError(f"the methods' hparams set different {key} roots ({listed}); pass "
                           f"--{'image-root' if key == 'coco_image' else 'rephrase-image-root'}")
        if seen:
            value, name = next(iter(seen.items()))
            out[key] = (value, f"{name}'s hparams {key}")
    return out


def resolve_roots(path: Path, fmt: Format, image_root: str | None, rephrase_image_root: str | None,
                  hparams: Sequence[Any] = ()) -> Roots:
    """The image and rephrase roots: the flags, else the hparams (EasyEdit-style formats), else the JSON's folder.

    The hparams' roots count only when neither flag is given (a flag and a YAML root are never mixed).
    """
    from_hp = hparams_roots(hparams) if fmt.hparams_roots and not (image_root or rephrase_image_root) else {}
    if image_root:
        image, image_from = Path(image_root), "--image-root"
    elif "coco_image" in from_hp:
        image, image_from = Path(from_hp["coco_image"][0]), from_hp["coco_image"][1]
    else:
        image, image_from = path.parent, "the JSON's folder"
    if rephrase_image_root:
        rephrase, rephrase_from = Path(rephrase_image_root), "--rephrase-image-root"
    elif "rephrase_image" in from_hp:
        rephrase, rephrase_from = Path(from_hp["rephrase_image"][0]), from_hp["rephrase_image"][1]
    else:
        rephrase, rephrase_from = image, image_from
    return Roots(image, rephrase, image_from, rephrase_from)


def read_json(path: Path) -> list[Any]:
    """The JSON list in ``path`` (a clear error for anything else)."""
    try:
        raw = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise MKEError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(raw, list) or not raw:
        raise MKEError(f"{path}: expected a non-empty JSON list of records")
    return raw


def load_dataset(path: Path, raw: Sequence[Any], *, fmt: str = "auto", image_root: str | None = None,
                 rephrase_image_root: str | None = None, hparams: Sequence[Any] = ()) -> Dataset:
    """``raw`` (the records of ``path``) read by the loader of ``fmt`` (``auto``: detected)."""
    if fmt not in FORMAT_CHOICES:
        raise MKEError(f"--format must be one of {', '.join(FORMAT_CHOICES)}, got {fmt!r}")
    try:
        name = detect(raw, path) if fmt == "auto" else fmt
        spec = FORMATS[name]
        roots = resolve_roots(path, spec, image_root, rephrase_image_root, hparams)
        requests, kept, skipped = spec.load(raw, roots)
    except MKEError as exc:
        msg = str(exc)
        raise MKEError(msg if msg.startswith(str(path)) else f"{path}: {msg}") from None
    if not requests:
        raise MKEError(f"{path}: no record left to edit ({len(skipped)} skipped: {spec.skip_rule})")
    fields = _world_fields() if name == "world" else spec.record_fields
    notes = [f"--format auto: {path.name} read as {name} ({spec.title})"] if fmt == "auto" and name != "world" else []
    return Dataset(path, name, requests, fields, kept, notes + skipped_note(name, skipped, spec.skip_rule))
