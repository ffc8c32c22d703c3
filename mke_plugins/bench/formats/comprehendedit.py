"""ComprehendEdit: eight VQA tasks, text and multimodal locality, no rephrased pictures.

The records (github.com/yaohui120/ComprehendEdit, README "The format of each sample"; EasyEdit
main's ``ComprehendEditDataset``, ``easyeditor/dataset/ComprehendEdit.py``) are ``image``,
``question``, ``rephrase``, ``answer``, ``source``, ``Category``, ``pid``, ``locality_prompt``,
``locality_ground_truth``, ``multimodal_locality_image``, ``multimodal_locality_prompt``,
``multimodal_locality_ground_truth`` (the test split adds neighbour lists such as
``img_topk``). Pictures are paths under the data folder (the JSON's folder; ``--image-root``
overrides it). Read as EasyEdit reads them (a record with an empty ``answer`` is skipped, the
prompt is the raw ``question`` as its dataset hands it to a method; the per-source question
templates are applied by its trainer's ``collate_fn`` only), with one difference: EasyEdit's
loader sets ``locality_ground_truth`` to the locality *prompt*; here it is the record's
``locality_ground_truth``, as the benchmark publishes it. The benchmark has no rephrased
pictures, so M-Gen (``image_rephrase_acc``) stays null.
"""

from __future__ import annotations

from typing import Any, Sequence

from mke_hooks import MKEError

from .common import Roots, absent, need, picture, read_records

REQUIRED = ("image", "question", "rephrase", "answer", "source", "Category", "locality_prompt",
            "multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth")
RECORD_FIELDS = {"prompt": "question", "target": "answer", "rephrase_prompt": "rephrase", "image": "image",
                 "locality_prompt": "locality_prompt", "locality_ground_truth": "locality_ground_truth",
                 "multimodal_locality_image": "multimodal_locality_image",
                 "multimodal_locality_prompt": "multimodal_locality_prompt",
                 "multimodal_locality_ground_truth": "multimodal_locality_ground_truth"}


def _request(record: dict[str, Any], index: int, roots: Roots) -> dict[str, Any] | None:
    v = {k: need(record, k, index, "ComprehendEdit") for k in REQUIRED}
    if v["answer"] == "":
        return None
    for key in ("question", "image"):
        if absent(v[key]):
            raise MKEError(f"record {index}: field {key!r} is empty; ComprehendEdit edits need it")
    req: dict[str, Any] = {"file_type": "image", "prompt": v["question"], "target": v["answer"],
                           "image": picture(roots.image, v["image"], index, "image", roots.image_from)}
    if v["rephrase"]:
        req["rephrase_prompt"] = v["rephrase"]
    answer = record.get("locality_ground_truth")
    if answer is not None and not isinstance(answer, str):
        raise MKEError(f"record {index}: field 'locality_ground_truth' must be a str, got {type(answer).__name__}")
    if v["locality_prompt"] and answer:
        req["locality_prompt"], req["locality_ground_truth"] = v["locality_prompt"], answer
    if v["multimodal_locality_image"] and v["multimodal_locality_prompt"] and v["multimodal_locality_ground_truth"]:
        req["multimodal_locality_image"] = picture(roots.image, v["multimodal_locality_image"], index,
                                                   "multimodal_locality_image", roots.image_from)
        req["multimodal_locality_prompt"] = v["multimodal_locality_prompt"]
        req["multimodal_locality_ground_truth"] = v["multimodal_locality_ground_truth"]
    req.update(case_id=index, source=v["source"], category=v["Category"])
    if "pid" in record:
        req["pid"] = record["pid"]
    return req


def claims(record: dict[str, Any]) -> bool:
    """A ComprehendEdit record: ``question``, ``answer`` and ``image`` plus its locality fields."""
    return all(k in record for k in ("question", "answer", "image", "multimodal_locality_prompt"))


def load(raw: Sequence[Any], roots: Roots) -> tuple[list[dict[str, Any]], list[int], list[int]]:
    """ComprehendEdit's records as requests (empty ``answer``: skipped)."""
    return read_records(raw, lambda r, i: _request(r, i, roots), "ComprehendEdit")
