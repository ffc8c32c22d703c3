"""Pre-edit quality of a world model: token accuracy per query form, trained and held out.

Sets (drawn deterministically from the world's seed):

- ``trained/<form>``: training templates, training renderings;
- ``heldout_template/<form>``: held-out templates, training renderings;
- ``heldout_rendering/<form>``: training templates, held-out renderings (picture forms);
- ``edit_src``: every edit case's paired ``src`` + ``image`` must give ``pred``;
- ``composition/<form>``: the derived question for entities whose derived fact was never trained
  (reported, not part of the floor: it measures whether the tiny model composes).

On a world whose model learns by composition (the ``lifelong`` layout), ``trained/paired`` and
``trained/image`` ask the entities trained on those forms, and ``composed/paired`` /
``composed/image`` the others, whose picture questions were never trained: they are answered by
composing a text-learnt fact with a picture aligned to a name, and are held to the held-out floor.

The floor (README, "Quality floor"): every ``trained`` form >= 0.95, every held-out set >= 0.8.
"""

from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .build import Split, make_split
from .data import Encoder, Item
from .queries import FORMS, IMAGE_FORMS, Question
from .spec import DERIVED, HELDOUT_RENDERINGS, TRAIN_RENDERINGS, World

TRAINED_FLOOR = 0.95
HELDOUT_FLOOR = 0.8


def _relations_for(world: World, split: Split, entity: int) -> list[str]:
    rels = [r.key for r in world.relations]
    if split.derived_trained(entity):
        rels.append(DERIVED.key)
    return rels


def sample_items(world: World, split: Split, rng: np.random.Generator, form: str, n: int,
                 heldout_template: bool = False, heldout_rendering: bool = False,
                 entities: Sequence[int] | None = None, relation: str | None = None) -> list[Item]:
    """``n`` random items of ``form`` (training data when both held-out flags are off)."""
    pool = list(entities) if entities is not None else list(range(len(world.entities)))
    out = []
    for _ in range(n):
        e = pool[int(rng.integers(len(pool)))]
        if form == "ident":
            rel = None
            n_t = 1 if heldout_template else 3
        else:
            rels = [relation] if relation else _relations_for(world, split, e)
            rel = rels[int(rng.integers(len(rels)))]
            r = world.relation(rel)
            n_t = len(r.heldout_templates if heldout_template else r.train_templates)
        t = int(rng.integers(n_t))
        rendering = None
        if form in IMAGE_FORMS:
            rendering = (TRAIN_RENDERINGS + int(rng.integers(HELDOUT_RENDERINGS)) if heldout_rendering
                         else int(rng.integers(TRAIN_RENDERINGS)))
        out.append(Item(Question(form, e, rel, t, heldout_template), rendering))
    return out


@torch.no_grad()
def correct(model: Any, enc: Encoder, items: Sequence[Item], batch_size: int = 256,
            targets: Sequence[str] | None = None) -> list[bool]:
    """Per item, whether the teacher-forced answer is right (answers are one token: argmax at the
    last prompt position equals the target)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    out: list[bool] = []
    for i in range(0, len(items), batch_size):
        chunk = items[i:i + batch_size]
        b = enc.encode(chunk, None if targets is None else targets[i:i + batch_size])
        tids = b.pop("target_ids").to(device)
        b = {k: (v.to(device, dtype) if v.is_floating_point() else v.to(device)) for k, v in b.items()}
        logits = model(**b, logits_to_keep=2).logits[:, 0]
        out += (logits.argmax(-1) == tids).tolist()
    model.train(was_training)
    return out


def accuracy(model: Any, enc: Encoder, items: Sequence[Item], batch_size: int = 256,
             targets: Sequence[str] | None = None) -> float:
    """Teacher-forced target-token accuracy of ``items`` (:func:`correct`)."""
    return sum(correct(model, enc, items, batch_size, targets)) / max(1, len(items))


def by_relation(items: Sequence[Item], right: Sequence[bool]) -> dict[str, float]:
    """Accuracy per relation of ``items`` (identification items, which ask none, left out)."""
    hits: dict[str, list[bool]] = {}
    for it, ok in zip(items, right, strict=True):
        if it.question.relation is not None:
            hits.setdefault(it.question.relation, []).append(bool(ok))
    return {rel: round(sum(v) / len(v), 3) for rel, v in sorted(hits.items())}


def check_sets(world: World, split: Split, n: int, seed_offset: int = 7) -> dict[str, list[Item]]:
    """The named evaluation sets, ``n`` items each."""
    rng = np.random.default_rng([world.seed, seed_offset])
    sets: dict[str, list[Item]] = {}
    direct = [e for e in range(len(world.entities)) if split.direct(e)]
    composed = [e for e in range(len(world.entities)) if not split.direct(e)]
    for form in FORMS:
        ents = direct if form in ("paired", "image") and composed else None
        sets[f"trained/{form}"] = sample_items(world, split, rng, form, n, entities=ents)
    if composed:
        for form in ("paired", "image"):
            sets[f"composed/{form}"] = sample_items(world, split, rng, form, n, entities=composed)
    for form in FORMS:
        sets[f"heldout_template/{form}"] = sample_items(world, split, rng, form, n, heldout_template=True)
    for form in IMAGE_FORMS:
        sets[f"heldout_rendering/{form}"] = sample_items(world, split, rng, form, n, heldout_rendering=True)
    port = sorted(split.portability_entities)
    if port:
        for form in ("paired", "text", "image"):
            sets[f"composition/{form}"] = sample_items(world, split, rng, form, n, entities=port,
                                                       relation=DERIVED.key)
    return sets


def edit_src_items(world: World, records: Sequence[dict[str, Any]]) -> tuple[list[Item], list[str]]:
    """Items for every request's ``prompt`` + ``image`` with ``pred`` as target.

    ``records`` are :func:`mke_plugins.world.record_paths` dicts (image paths, not pictures).
    """
    from .queries import prompt

    names = {e.name: e.index for e in world.entities}
    items, targets = [], []
    for rec in records:
        e = names[rec["entity"]]
        rel = world.relation(rec["relation"])
        t = next(i for i, tpl in enumerate(rel.train_templates)
                 if prompt(world, Question("paired", e, rel.key, i)) == rec["prompt"])
        index = int(str(rec["image"]).rsplit("_r", 1)[1].split(".")[0])
        items.append(Item(Question("paired", e, rel.key, t), index))
        targets.append(rec["pred"])
    return items, targets


def run_check(model: Any, processor: Any, world: World, split: Split | None = None, n: int = 512,
              records: Sequence[dict[str, Any]] | None = None) -> dict[str, Any]:
    """All accuracies plus ``floor_met`` and the list of ``failures``.

    ``heldout_template_by_relation`` breaks each held-out-template set down by relation. Each
    relation has one held-out template, so a set is the mean of a handful of templates: one
    template the model misreads (answering a name, or one object for every entity) moves the set by
    about 1 / (number of relations), which is how builds of one recipe fall on both sides of the
    floor (world README, "Rebuilding on another machine")."""
    split = split or make_split(world)
    enc = Encoder(world, processor)
    acc: dict[str, float] = {}
    per_relation: dict[str, dict[str, float]] = {}
    for name, items in check_sets(world, split, n).items():
        right = correct(model, enc, items)
        acc[name] = sum(right) / max(1, len(items))
        if name.startswith("heldout_template/") and name != "heldout_template/ident":
            per_relation[name.split("/", 1)[1]] = by_relation(items, right)
    if records is not None:
        items, targets = edit_src_items(world, records)
        acc["edit_src"] = accuracy(model, enc, items, targets=targets)
    failures = []
    for name, a in acc.items():
        if name.startswith("trained/") or name == "edit_src":
            if a < TRAINED_FLOOR:
                failures.append(f"{name} {a:.3f} < {TRAINED_FLOOR}")
        elif name.startswith(("heldout_", "composed/")):
            if a < HELDOUT_FLOOR:
                failures.append(f"{name} {a:.3f} < {HELDOUT_FLOOR}")
    return {"accuracy": acc, "n_per_set": n, "floor": {"trained": TRAINED_FLOOR, "heldout": HELDOUT_FLOOR},
            "floor_met": not failures, "failures": failures, "heldout_template_by_relation": per_relation}
