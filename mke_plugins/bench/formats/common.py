"""What every benchmark loader shares: image roots, field checks, portability items, the result.

A loader reads one benchmark's records into the request dicts the bench and the offline stages
use (``prompt``, ``target``, ``image``, ... as EasyEdit's datasets name them). Each loader checks
every record it keeps, naming the record index and the benchmark's own field name, and checks
that every picture it names exists, saying which root the path was resolved under and where
that root came from (a flag, a method's hparams or the JSON's folder). Pictures are decoded
later, still before the first edit (:func:`mke_plugins.bench.data.with_images`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

from mke_hooks import MKEError


@dataclass(frozen=True)
class Roots:
    """The two image folders of a dataset and where each came from (for error messages)."""

    image: Path
    rephrase: Path
    image_from: str = "the JSON's folder"
    rephrase_from: str = "the JSON's folder"


@dataclass
class Dataset:
    """Requests read from one file, and how to name a request's record and field in errors."""

    path: Path
    format: str
    requests: list[dict[str, Any]]
    #: request key -> the benchmark's record field (``prompt`` -> ``src``)
    record_fields: dict[str, str] = field(default_factory=dict)
    #: record index (in the file) of each request; records a benchmark's loader skips have none
    record_index: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def where(self, index: int, key: str) -> str:
        """``record 3, field 'src'`` for request ``index`` and request key ``key``."""
        rec = self.record_index[index] if index < len(self.record_index) else index
        head, dot, tail = key.partition("[")
        name = self.record_fields.get(head, head) + (dot + tail if dot else "")
        return f"record {rec}, field {name!r}"


def absent(value: Any) -> bool:
    """``None`` or an empty string, list or dict: EasyEdit's loaders treat these as missing."""
    return value is None or (isinstance(value, (str, list, dict)) and len(value) == 0)


def need(record: dict[str, Any], key: str, index: int, what: str, kind: type = str) -> Any:
    """``record[key]``, which must be present and of ``kind`` (an empty string is allowed here)."""
    if key not in record:
        raise MKEError(f"record {index}: field {key!r} is missing ({what} records carry it)")
    value = record[key]
    if not isinstance(value, kind) or isinstance(value, bool):
        raise MKEError(f"record {index}: field {key!r} must be a {kind.__name__}, got {type(value).__name__} "
                       f"{json.dumps(value)[:40]}")
    return value


def check_object(record: Any, index: int, what: str) -> dict[str, Any]:
    """``record`` itself, which must be a JSON object."""
    if not isinstance(record, dict):
        raise MKEError(f"record {index}: expected a JSON object ({what} record), got {type(record).__name__} "
                       f"{json.dumps(record)[:40]}")
    return record


def picture(root: Path, rel: str, index: int, key: str, origin: str) -> str:
    """The absolute path of picture ``rel`` under ``root``; it must exist."""
    path = root / rel
    if not path.is_file():
        raise MKEError(f"record {index}, field {key!r}: image {path} not found (image root {root}, from {origin}); "
                       f"pass --image-root / --rephrase-image-root, or fix the path")
    return str(path)


def text_or_none(record: dict[str, Any], key: str) -> str | None:
    """``record[key]`` as text, or ``None`` when it is absent or empty."""
    value = record.get(key)
    return None if absent(value) else str(value)


def port_new_items(record: dict[str, Any], index: int, image: str | None) -> list[dict[str, Any]]:
    """VLKEB / MMKE-Bench ``port_new`` as portability items, every hop, asked with ``image``.

    Items are ``{"port_type": "1-hop", "Q&A": {"Question", "Answer"}}`` (the multi-hop files) or
    ``{"port_q", "port_a", ...}`` (VLKEB's edit-one-hop file); the hop goes to the item's ``form``.
    """
    items = record.get("port_new")
    if absent(items):
        return []
    if not isinstance(items, list):
        raise MKEError(f"record {index}: field 'port_new' must be a list of portability questions, got "
                       f"{type(items).__name__}")
    out = []
    for j, item in enumerate(items):
        qa = item.get("Q&A") if isinstance(item, dict) else None
        if isinstance(qa, dict):
            q, a, form = qa.get("Question"), qa.get("Answer"), item.get("port_type", "")
        elif isinstance(item, dict) and "port_q" in item:
            q, a, form = item.get("port_q"), item.get("port_a"), "1-hop"
        else:
            raise MKEError(f"record {index}: port_new[{j}] needs 'port_type' and 'Q&A' with 'Question' and 'Answer' "
                           f"(or 'port_q' and 'port_a')")
        if absent(q) or absent(a) or not isinstance(q, str):
            raise MKEError(f"record {index}: port_new[{j}] has an empty or non-text question or answer")
        out.append({"prompt": q, "answer": str(a), "image": image, "form": str(form)})
    return out


def read_records(raw: Sequence[Any], read_one: Callable[[dict[str, Any], int], dict[str, Any] | None],
                 what: str) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """``(requests, record indices, skipped indices)`` of ``read_one`` over every record."""
    requests, kept, skipped = [], [], []
    for i, record in enumerate(raw):
        req = read_one(check_object(record, i, what), i)
        if req is None:
            skipped.append(i)
            continue
        requests.append(req)
        kept.append(i)
    return requests, kept, skipped


def skipped_note(fmt: str, skipped: list[int], rule: str) -> list[str]:
    """The note a run carries when a loader skipped records the way the benchmark's own loader does."""
    if not skipped:
        return []
    shown = ", ".join(map(str, skipped[:10])) + (", ..." if len(skipped) > 10 else "")
    return [f"{fmt}: skipped {len(skipped)} record(s) ({shown}): {rule}"]
