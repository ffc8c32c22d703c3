"""Edit cases and the offline ``train`` split, written as MMEdit E-VQA JSON plus PNGs.

``build(out, seed)`` writes ``out/edit.json``, ``out/train.json``, ``out/world.json`` (the
world itself: names, identities, facts, which entities had their derived fact trained) and
``out/images/*.png``; image paths in records are relative to ``out``, so EasyEdit's
``VQADataset`` loads ``edit.json`` with ``coco_image = rephrase_image = out``. Everything is a
pure function of the seed: building twice gives identical bytes.

Split rule: the edit split holds ``n_edits`` facts; its ``lives_in`` edits are few (a quarter of
the entities), and exactly those entities never see the derived ``country`` question in the
world model's training, so portability measures composition. The ``train`` split holds every
other fact, never an edit-split fact.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .queries import Question, answer, prompt
from .render import render
from .spec import (
    CITY_COUNTRY,
    DEFAULT_EDITS,
    DEFAULT_ENTITIES,
    DEFAULT_SEED,
    DERIVED,
    HELDOUT_RENDERINGS,
    LINK_SOURCE,
    TRAIN_RENDERINGS,
    World,
    make_world,
)

FORMAT_VERSION = 2  # bump whenever generated content changes (cache key)


@dataclass(frozen=True)
class Split:
    """Which facts are edited and which entities' derived fact the model is not trained on."""

    edit: list[tuple[int, str]]  # (entity, relation) in record order
    train: list[tuple[int, str]]
    portability_entities: frozenset[int]

    def derived_trained(self, entity: int) -> bool:
        return entity not in self.portability_entities


def make_split(world: World, n_edits: int = DEFAULT_EDITS) -> Split:
    """Choose the edited facts (deterministic in the world's seed)."""
    n_ent = len(world.entities)
    rels = [r.key for r in world.relations]
    n_port = max(1, n_ent // 4)
    if n_edits < 1:
        raise ValueError(f"n_edits must be >= 1, got {n_edits}")
    n_port = min(n_port, n_edits)
    rest = n_edits - n_port
    others = [r for r in rels if r != LINK_SOURCE]
    quotas = {LINK_SOURCE: n_port}
    for i, r in enumerate(others):
        quotas[r] = rest // len(others) + (1 if i < rest % len(others) else 0)
    too_big = {r: q for r, q in quotas.items() if q > n_ent}
    if too_big:
        raise ValueError(f"n_edits={n_edits} needs more than {n_ent} edits per relation ({too_big}); "
                         f"use at most {n_port + n_ent * len(others)} edits or more entities")
    rng = np.random.default_rng([world.seed, 3])
    edit: list[tuple[int, str]] = []
    for r in rels:
        chosen = sorted(int(e) for e in rng.permutation(n_ent)[: quotas[r]])
        edit += [(e, r) for e in chosen]
    order = rng.permutation(len(edit))
    edit = [edit[int(i)] for i in order]
    in_edit = set(edit)
    train = [(e, r) for e in range(n_ent) for r in rels if (e, r) not in in_edit]
    port = frozenset(e for e, r in edit if r == LINK_SOURCE)
    return Split(edit, train, port)


class _Images:
    """Writes each (entity, rendering) PNG once and hands out its relative path."""

    def __init__(self, world: World, out: Path | None):
        self.world, self.out, self.paths = world, out, {}

    def __call__(self, entity: int, index: int) -> str:
        rel = f"images/e{entity:03d}_r{index:04d}.png"
        if rel not in self.paths and self.out is not None:
            img = render(self.world.seed, self.world.entities[entity], index)
            img.save(self.out / rel, format="PNG", optimize=False, compress_level=6)
        self.paths[rel] = True
        return rel


def _record(world: World, split: Split, e: int, rel: str, rng: np.random.Generator,
            images: _Images, case_id: int) -> dict[str, Any]:
    ent = world.entities[e]
    relation = world.relation(rel)
    old = ent.facts[rel]
    choices = [o for o in relation.objects if o != old]
    if rel == LINK_SOURCE:  # the derived answer must change too
        choices = [o for o in choices if CITY_COUNTRY[o] != CITY_COUNTRY[old]]
    alt = choices[int(rng.integers(len(choices)))]
    t = int(rng.integers(len(relation.train_templates)))
    img = images(e, int(rng.integers(TRAIN_RENDERINGS)))
    img_re = images(e, TRAIN_RENDERINGS + int(rng.integers(HELDOUT_RENDERINGS)))
    n_ent = len(world.entities)
    rels = [r.key for r in world.relations]

    def other_entity() -> int:
        o = int(rng.integers(n_ent - 1))
        return o + 1 if o >= e else o

    e2, r2 = other_entity(), rels[int(rng.integers(len(rels)))]
    q_loc = Question("text", e2, r2, int(rng.integers(3)))
    e3, r3 = other_entity(), rels[int(rng.integers(len(rels)))]
    q_mloc = Question("image", e3, r3, int(rng.integers(3)))
    m_loc = images(e3, int(rng.integers(TRAIN_RENDERINGS)))

    fine: list[dict[str, Any]] = []
    other_rels = [r for r in rels if r != rel]
    if rel != LINK_SOURCE and split.derived_trained(e):
        other_rels.append(DERIVED.key)
    for r in other_rels:
        a = answer(world, ent, r)
        for form in ("paired", "text", "image"):
            item: dict[str, Any] = {"prompt": prompt(world, Question(form, e, r, t)), "answer": a,
                                    "form": form, "relation": r}
            if form != "text":
                item["image"] = img
            fine.append(item)
    port: list[dict[str, Any]] = []
    if rel == LINK_SOURCE:
        for form in ("paired", "text", "image"):
            item = {"prompt": prompt(world, Question(form, e, DERIVED.key, t)),
                    "answer": CITY_COUNTRY[alt], "form": form, "relation": DERIVED.key}
            if form != "text":
                item["image"] = img
            port.append(item)
    src = prompt(world, Question("paired", e, rel, t))
    return {
        "case_id": case_id,
        "src": src,
        "rephrase": prompt(world, Question("paired", e, rel, 0, heldout=True)),
        "pred": old,
        "alt": alt,
        "image": img,
        "image_rephrase": img_re,
        "loc": prompt(world, q_loc),
        "loc_ans": answer(world, world.entities[e2], r2),
        "m_loc": m_loc,
        "m_loc_q": prompt(world, q_mloc),
        "m_loc_a": answer(world, world.entities[e3], r3),
        "text_only_prompt": src,
        "image_only_prompt": prompt(world, Question("image", e, rel, t)),
        "fine_locality": fine,
        "portability": port,
        "entity": ent.name,
        "relation": rel,
    }


def make_records(world: World, split: Split, which: str, images: _Images) -> list[dict[str, Any]]:
    facts = {"edit": split.edit, "train": split.train}[which]
    rng = np.random.default_rng([world.seed, 4 if which == "edit" else 5])
    return [_record(world, split, e, r, rng, images, i) for i, (e, r) in enumerate(facts)]


def world_summary(world: World, split: Split, n_edits: int) -> dict[str, Any]:
    return {
        "format_version": FORMAT_VERSION,
        "seed": world.seed,
        "n_entities": len(world.entities),
        "n_edits": n_edits,
        "train_renderings": TRAIN_RENDERINGS,
        "heldout_renderings": HELDOUT_RENDERINGS,
        "entities": [{"name": e.name, "colours": list(e.colours), "shape": e.shape,
                      "pattern": e.pattern, "facts": e.facts,
                      "derived_trained": split.derived_trained(e.index)} for e in world.entities],
        "city_country": CITY_COUNTRY,
    }


def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n")


def build(out: str | Path, seed: int = DEFAULT_SEED, n_entities: int = DEFAULT_ENTITIES,
          n_edits: int = DEFAULT_EDITS) -> Path:
    """Write the world for ``seed`` into ``out`` (created if needed); return ``out``."""
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    world = make_world(seed, n_entities)
    split = make_split(world, n_edits)
    images = _Images(world, out)
    edit = make_records(world, split, "edit", images)
    train = make_records(world, split, "train", images)
    _dump(edit, out / "edit.json")
    _dump(train, out / "train.json")
    _dump(world_summary(world, split, n_edits), out / "world.json")
    return out
