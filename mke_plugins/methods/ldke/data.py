"""Training data of the Disentanglement Classifier (README, "The archive and its training").

:class:`RoutingRecord` holds, for one training-split record, the key (its edit input) and its
positives, hard negatives and easy negatives as adapter ``Query`` objects (each with the answer
the model should give: the new target for positives, the current answer for negatives).
:class:`LDKERoutingDataset` is a ``torch.utils.data.Dataset`` whose ``collate_fn`` builds the
batch EasyEdit's ``MultimodalTrainer`` expects (``edit_inner``, ``edit_outer``,
``edit_outer_image``, ``loc``, ``loc_image``, ``cond``): ``edit_outer`` draws one positive per
record from rephrase / text-only / image-only / portability, ``edit_outer_image`` the image
rephrase, and ``loc`` / ``loc_image`` hold ``neg_per_pos`` negatives per positive row, each hard
with probability ``hard_negative_fraction``. Negatives that come from other records (the same
entity's other facts and other entities' facts of the same relation: hard; other facts: easy) are
taken in every query form the record has (paired, text-only, image-only), so no modality form is a
shortcut to "positive", and "same question about another entity" is learnt as a negative. Rows of
a part are record-major: row ``r`` of a part with ``k`` rows per record belongs to record
``r // k``. Parts are built by the family adapter exactly as EasyEdit's evaluator builds inputs
(HF: the tensors plus sequence-aligned ``labels``; LAVIS: the wrapper's sample dicts).

Validation records are a split *by entity* (``val_fraction`` of the records); their full
positive / negative lists serve head selection and threshold calibration.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from typing import Any, Sequence

from torch import nn
from torch.utils.data import Dataset

from mke_plugins.adapters.base import Batch, Query, VLMAdapter
from mke_plugins.core.requests import get_field


@dataclass
class RoutingRecord:
    """One training record's key and labelled inputs."""

    key: Query
    positives: list[Query] = field(default_factory=list)  # outer (text side) positives
    image_positives: list[Query] = field(default_factory=list)  # image-rephrase positives
    hard: list[Query] = field(default_factory=list)
    easy: list[Query] = field(default_factory=list)
    entity: str = ""


def _present(v: Any) -> bool:
    return v is not None and not (isinstance(v, (str, list, tuple)) and len(v) == 0)


def _probe(item: dict[str, Any]) -> Query:
    return Query(item.get("image") if _present(item.get("image")) else None, item["prompt"], str(item["answer"]))


def _forms(o: dict[str, Any]) -> list[Query]:
    """Another record's edit question in each query form it has (paired, text-only, image-only),
    with its current answer: negatives in every modality form the positives come in."""
    answer = str(o.get("pred") or o["target"])
    out = [Query(o.get("image"), o["prompt"], answer)]
    if _present(get_field(o, "text_only_prompt")):
        out.append(Query(None, o["text_only_prompt"], answer))
    if _present(get_field(o, "image_only_prompt")) and _present(o.get("image")):
        out.append(Query(o["image"], o["image_only_prompt"], answer))
    return out


def routing_records(records: Sequence[dict[str, Any]], *, hard_negatives: bool = True,
                    max_others: int = 4, seed: int = 0, locality_negatives: bool = True) -> list[RoutingRecord]:
    """Build the labelled inputs of every record (world / MMEdit-style request dicts); without
    ``locality_negatives`` a record's own locality probes are left out."""
    rng = random.Random(seed)
    out = []
    by_entity: dict[str, list[int]] = {}
    for i, r in enumerate(records):
        by_entity.setdefault(str(r.get("entity", i)), []).append(i)
    for i, r in enumerate(records):
        img, prompt, target = r.get("image"), r["prompt"], r["target"]
        rec = RoutingRecord(key=Query(img, prompt, target), entity=str(r.get("entity", i)))
        rec.positives.append(Query(img, prompt, target))
        if _present(r.get("rephrase_prompt")):
            rec.positives.append(Query(img, r["rephrase_prompt"], target))
        if _present(get_field(r, "text_only_prompt")):
            rec.positives.append(Query(None, r["text_only_prompt"], target))
        if _present(get_field(r, "image_only_prompt")) and _present(img):
            rec.positives.append(Query(img, r["image_only_prompt"], target))
        rec.positives += [_probe(p) for p in (r.get("portability") or [])]
        if _present(r.get("image_rephrase")):
            rec.image_positives.append(Query(r["image_rephrase"], prompt, target))
        loc_fields = ("multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth")
        if locality_negatives and _present(r.get("locality_prompt")) and _present(r.get("locality_ground_truth")):
            rec.easy.append(Query(None, r["locality_prompt"], str(r["locality_ground_truth"])))
        if locality_negatives and all(_present(r.get(k)) for k in loc_fields):
            rec.easy.append(Query(r["multimodal_locality_image"], r["multimodal_locality_prompt"],
                                  str(r["multimodal_locality_ground_truth"])))
        others = [j for j in range(len(records)) if j != i]
        same_entity = [j for j in by_entity.get(rec.entity, []) if j != i]
        for j in rng.sample(others, min(max_others, len(others))):
            if j not in same_entity:
                rec.easy += _forms(records[j])
        if hard_negatives:
            rec.hard += [_probe(p) for p in (r.get("fine_locality") or [])]
            for j in same_entity:
                o = records[j]
                if o.get("relation") != r.get("relation") or "relation" not in r:
                    rec.hard += _forms(o)
            same_rel = [j for j in others if records[j].get("relation") == r.get("relation")
                        and j not in same_entity and "relation" in r]
            if same_rel and _present(get_field(r, "image_only_prompt")):
                o = records[rng.choice(same_rel)]
                if _present(o.get("image")):
                    rec.hard.append(Query(o["image"], r["image_only_prompt"], str(o.get("pred") or o["target"])))
            for j in rng.sample(same_rel, min(max_others, len(same_rel))):  # same question, another entity
                rec.hard += _forms(records[j])
        out.append(rec)
    return out


def split_by_entity(records: Sequence[dict[str, Any]], val_fraction: float, seed: int
                    ) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation): whole entities go to validation until ``val_fraction`` of the records."""
    entities = sorted({str(r.get("entity", i)) for i, r in enumerate(records)})
    random.Random(seed).shuffle(entities)
    want = max(1, int(round(val_fraction * len(records))))
    val_entities: set[str] = set()
    count = 0
    for e in entities:
        if count >= want:
            break
        val_entities.add(e)
        count += sum(1 for i, r in enumerate(records) if str(r.get("entity", i)) == e)
    train = [r for i, r in enumerate(records) if str(r.get("entity", i)) not in val_entities]
    val = [r for i, r in enumerate(records) if str(r.get("entity", i)) in val_entities]
    if not train or not val:
        raise ValueError(f"cannot split {len(records)} records into training and validation by entity "
                         f"(val_fraction {val_fraction}); give more records")
    return train, val


def host_part(batch: Batch) -> Any:
    """An adapter batch as an EasyEdit trainer part: HF tensors plus ``labels``, or LAVIS samples."""
    if "samples" in batch.inputs:
        return batch.inputs["samples"]
    return {**batch.inputs, "labels": batch.labels}


class LDKERoutingDataset(Dataset):
    """Routing records with EasyEdit's trainer batch layout (see the module docstring)."""

    def __init__(self, records: Sequence[RoutingRecord], adapter: VLMAdapter, model: nn.Module, tok: Any, *,
                 neg_per_pos: int = 3, hard_negative_fraction: float = 0.5, seed: int = 0) -> None:
        self.records = list(records)
        self.adapter, self.model, self.tok = adapter, model, tok
        self.neg_per_pos = neg_per_pos
        self.hard_fraction = hard_negative_fraction
        self.rng = random.Random(seed)

    def bind(self, model: nn.Module) -> None:
        """Build inputs for this model (device, dtype) from now on (EasyEdit's trainer loads its own)."""
        self.model = model

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> RoutingRecord:
        return self.records[index]

    def _negatives(self, rec: RoutingRecord, n: int) -> list[Query]:
        out = []
        for _ in range(n):
            hard = rec.hard and self.rng.random() < self.hard_fraction
            pool = rec.hard if hard else (rec.easy or rec.hard)
            out.append(self.rng.choice(pool))
        return out

    def _part(self, queries: list[Query]) -> Any:
        return host_part(self.adapter.batch(self.model, self.tok, queries))

    def collate_fn(self, batch: list[RoutingRecord]) -> dict[str, Any]:
        outer = [self.rng.choice(r.positives[1:] or r.positives) for r in batch]
        outer_image = [self.rng.choice(r.image_positives or r.positives) for r in batch]
        n_neg = 2 * self.neg_per_pos
        k_loc = int(math.ceil(n_neg / 2))
        negs = [self._negatives(r, n_neg) for r in batch]
        return {
            "edit_inner": self._part([r.key for r in batch]),
            "edit_outer": self._part(outer),
            "edit_outer_image": self._part(outer_image),
            "loc": self._part([q for ns in negs for q in ns[:k_loc]]),
            "loc_image": self._part([q for ns in negs for q in ns[k_loc:]]),
            "cond": [f"{r.key.target} || {r.key.prompt}" for r in batch],
        }
