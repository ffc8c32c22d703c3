"""MMEdit E-VQA and E-IC, and VLKEB: EasyEdit-style records read as EasyEdit's datasets read them.

E-VQA (``VQADataset``, ``easyeditor/dataset/vqa.py``) and E-IC (``CaptionDataset``,
``easyeditor/dataset/coco_caption.py``) share one record: ``src``, ``pred``, ``alt``,
``rephrase``, ``image``, ``image_rephrase``, ``loc``, ``loc_ans``, ``m_loc``, ``m_loc_q``,
``m_loc_a``; every key must be present (EasyEdit indexes each one). ``image`` and ``m_loc`` are
paths under ``coco_image`` (``--image-root``), ``image_rephrase`` under ``rephrase_image``
(``--rephrase-image-root``). Records are kept and skipped as EasyEdit keeps them: both skip a
record whose ``alt`` is empty; E-VQA also skips one with any other empty text field. The prompt
is ``src`` verbatim, as EasyEdit hands it to a method: for E-IC that is the caption prompt (a
caption prefix such as "a picture of", the caption as target), with no question template; the
``"Question: {} Short answer:"`` wrapper EasyEdit's trainer puts round ``m_loc_q`` is a
``collate_fn`` detail of training batches, not part of the request.

VLKEB (github.com/VLKEB/VLKEB, its fork of ``CaptionDataset``) uses the same record plus
``port_new``: its multi-hop evaluation file lists ``{"port_type": "1-hop".."4-hop",
"Q&A": {"Question", "Answer"}}`` per record. VLKEB evaluates one hop per run, asked with the
edit's picture; here every hop becomes a ``portability`` item (its hop in ``form``).
"""

from __future__ import annotations

from typing import Any, Sequence

from mke_hooks import MKEError

from .common import Roots, absent, need, picture, port_new_items, read_records

#: the keys of an MMEdit record, in EasyEdit's order
MMEDIT_KEYS = ("src", "pred", "alt", "rephrase", "image", "image_rephrase", "loc", "loc_ans", "m_loc", "m_loc_q",
               "m_loc_a")
#: request key -> record field
RECORD_FIELDS = {"prompt": "src", "pred": "pred", "target": "alt", "rephrase_prompt": "rephrase", "image": "image",
                 "image_rephrase": "image_rephrase", "locality_prompt": "loc", "locality_ground_truth": "loc_ans",
                 "multimodal_locality_image": "m_loc", "multimodal_locality_prompt": "m_loc_q",
                 "multimodal_locality_ground_truth": "m_loc_a", "portability": "port_new"}


def mmedit_request(record: dict[str, Any], index: int, roots: Roots, what: str, *,
                   skip_any_empty: bool) -> dict[str, Any] | None:
    """One MMEdit record as a request (images as checked absolute paths), or ``None`` when EasyEdit skips it."""
    v = {k: need(record, k, index, what) for k in MMEDIT_KEYS}
    if v["alt"] == "" or (skip_any_empty and any(x == "" for x in v.values())):
        return None
    for key in ("src", "image"):
        if absent(v[key]):
            raise MKEError(f"record {index}: field {key!r} is empty; {what} edits need it")
    req: dict[str, Any] = {"file_type": "image", "prompt": v["src"], "target": v["alt"]}
    if v["pred"]:
        req["pred"] = v["pred"]
    if v["rephrase"]:
        req["rephrase_prompt"] = v["rephrase"]
    req["image"] = picture(roots.image, v["image"], index, "image", roots.image_from)
    if v["image_rephrase"]:
        req["image_rephrase"] = picture(roots.rephrase, v["image_rephrase"], index, "image_rephrase",
                                        roots.rephrase_from)
    if v["loc"] and v["loc_ans"]:
        req["locality_prompt"], req["locality_ground_truth"] = v["loc"], v["loc_ans"]
    if v["m_loc"] and v["m_loc_q"] and v["m_loc_a"]:
        req["multimodal_locality_image"] = picture(roots.image, v["m_loc"], index, "m_loc", roots.image_from)
        req["multimodal_locality_prompt"] = v["m_loc_q"]
        req["multimodal_locality_ground_truth"] = v["m_loc_a"]
    req["case_id"] = index
    return req


def _plain_mmedit(record: dict[str, Any]) -> bool:
    """Every MMEdit key, no VLKEB portability, no world or MMKE-Bench extension."""
    return all(k in record for k in MMEDIT_KEYS) and "port_new" not in record and "knowledge_type" not in record \
        and not any(k in record for k in ("text_only_prompt", "image_only_prompt", "fine_locality", "portability"))


def _is_question(record: dict[str, Any]) -> bool:
    return isinstance(record.get("src"), str) and record["src"].rstrip().endswith("?")


def claims_vqa(record: dict[str, Any]) -> bool:
    """A plain MMEdit record whose ``src`` is a question (E-VQA: "What is the red food?")."""
    return _plain_mmedit(record) and _is_question(record)


def claims_caption(record: dict[str, Any]) -> bool:
    """A plain MMEdit record whose ``src`` is a caption prompt, not a question (E-IC: "a photo of")."""
    return _plain_mmedit(record) and not _is_question(record)


def load_vqa(raw: Sequence[Any], roots: Roots) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """E-VQA: EasyEdit's ``VQADataset`` (skips a record with an empty ``alt`` or any other empty field)."""
    return read_records(raw, lambda r, i: mmedit_request(r, i, roots, "E-VQA", skip_any_empty=True), "E-VQA")


def load_caption(raw: Sequence[Any], roots: Roots) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """E-IC: EasyEdit's ``CaptionDataset`` (skips a record with an empty ``alt``; other empty fields: no probe)."""
    return read_records(raw, lambda r, i: mmedit_request(r, i, roots, "E-IC", skip_any_empty=False), "E-IC")


def _vlkeb_request(record: dict[str, Any], index: int, roots: Roots) -> dict[str, Any] | None:
    req = mmedit_request(record, index, roots, "VLKEB", skip_any_empty=False)
    if req is not None:
        port = port_new_items(record, index, req["image"])
        if port:
            req["portability"] = port
    return req


def claims_vlkeb(record: dict[str, Any]) -> bool:
    """An MMEdit record with VLKEB's ``port_new`` (and no MMKE-Bench ``knowledge_type``)."""
    return all(k in record for k in MMEDIT_KEYS) and "port_new" in record and "knowledge_type" not in record


def load_vlkeb(raw: Sequence[Any], roots: Roots) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """VLKEB's evaluation files: MMEdit records, ``port_new`` (every hop) as ``portability``."""
    return read_records(raw, lambda r, i: _vlkeb_request(r, i, roots), "VLKEB")
