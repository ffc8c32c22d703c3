"""MMKE-Bench: entity, visual-semantic and user-specific edits with free-form answers.

The records (github.com/mmke-bench-bigai/mmke-bench, ``easyeditor/dataset/coco_caption.py``;
files ``data_json/{entity,visual,user}_{train,eval}.json``, pictures under ``data_image``, the
``coco_image`` of its YAMLs) are MMEdit records (``src``, ``pred``, ``alt``, ``rephrase``,
``image``, ``image_rephrase``, ``loc``, ``loc_ans``, ``m_loc``, ``m_loc_q``, ``m_loc_a``) whose
``alt`` is a free-form description, plus ``knowledge_type`` (``entity_level``,
``visual_knowledge``, ``user_specific``), ``one_hop_img`` (visual and user edits: the picture
portability questions are asked with), the task's reliability questions (``rel_1``/``rel_ans_1``,
``m_rel_1``, ... or ``rel``/``m_rel``/``image_rephrase_question`` for visual edits) and
``port_new`` (``{"port_type", "Q&A": {"Question", "Answer"}}``).

Read as its loader reads them: a record with an empty ``alt`` is skipped; ``port_new`` becomes
``portability`` (every hop), asked with the edit's picture for entity edits and with
``one_hop_img`` otherwise, as the benchmark does. The reliability questions (its T-Rel, I-Rel
and I-Gen) have no column in this bench and are not read; the edit itself is scored as EasyEdit
scores a MMEdit record (reliability, T-Gen, M-Gen, T-Loc, M-Loc, portability).
"""

from __future__ import annotations

from typing import Any, Sequence

from mke_hooks import MKEError

from .common import Roots, need, picture, port_new_items, read_records
from .mmedit import MMEDIT_KEYS, mmedit_request

KNOWLEDGE_TYPES = ("entity_level", "visual_knowledge", "user_specific")
RECORD_FIELDS = {"knowledge_type": "knowledge_type"}


def _request(record: dict[str, Any], index: int, roots: Roots) -> dict[str, Any] | None:
    kind = need(record, "knowledge_type", index, "MMKE-Bench")
    if kind not in KNOWLEDGE_TYPES:
        raise MKEError(f"record {index}: field 'knowledge_type' is {kind!r}; MMKE-Bench uses "
                       f"{', '.join(KNOWLEDGE_TYPES)}")
    req = mmedit_request(record, index, roots, "MMKE-Bench", skip_any_empty=False)
    if req is None:
        return None
    req["knowledge_type"] = kind
    port_image = req["image"]
    if kind != "entity_level":
        rel = need(record, "one_hop_img", index, f"MMKE-Bench {kind}")
        port_image = picture(roots.image, rel, index, "one_hop_img", roots.image_from)
    port = port_new_items(record, index, port_image)
    if port:
        req["portability"] = port
    return req


def claims(record: dict[str, Any]) -> bool:
    """An MMEdit record with MMKE-Bench's ``knowledge_type``."""
    return "knowledge_type" in record and all(k in record for k in MMEDIT_KEYS)


def load(raw: Sequence[Any], roots: Roots) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """MMKE-Bench's records as requests (empty ``alt``: skipped)."""
    return read_records(raw, lambda r, i: _request(r, i, roots), "MMKE-Bench")
