"""Edit cases and the offline ``train`` split, written as MMEdit E-VQA JSON plus PNGs.

``build(out, seed)`` writes ``out/edit.json``, ``out/train.json``, ``out/world.json`` (the
world itself: names, identities, facts, which entities had their derived fact trained) and
``out/images/*.png``; image paths in records are relative to ``out``, so EasyEdit's
``VQADataset`` loads ``edit.json`` with ``coco_image = rephrase_image = out``. Everything is a
pure function of the seed and the layout: building twice gives identical bytes.

Split rule (``single`` layout): the edit split holds ``n_edits`` facts; its ``lives_in`` edits are few
(a quarter of the entities), and exactly those entities never see the derived ``country``
question in the world model's training, so portability measures composition. The ``train``
split holds every other fact, never an edit-split fact.

Split rule (``lifelong`` layout): a locality pool of whole entities that nothing else uses (its
facts, in every query form, are ``locality.json``, and every record's T-Loc and M-Loc probe asks
one of them, except a train record's: its probes ask other train-split facts, so nothing the offline
stages read names a pool fact), and, over the other entities, three disjoint fact sets drawn at
random: the acceptance sequence (``edit.json``, in sequence order), the development sequence
(``dev.json``) and the train split. Entities whose ``lives_in`` fact is in either sequence never see the
derived question in training. Every probe names its fact (``loc_fact``, ``m_loc_fact``, and
``entity`` / ``relation`` / ``derived_from`` on each ``fine_locality`` and ``portability``
item), so a bench can tell which probes an edit sequence touches.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from .queries import Question, answer, prompt
from .render import render
from .spec import (
    CITY_COUNTRY,
    DEFAULT_EDITS,
    DEFAULT_SEED,
    DERIVED,
    HELDOUT_RENDERINGS,
    LINK_SOURCE,
    TRAIN_RENDERINGS,
    World,
    make_world,
)

FORMAT_VERSION = 4  # bump whenever generated content changes (cache key)


@dataclass(frozen=True)
class Split:
    """Which facts are edited and which entities' derived fact the model is not trained on."""

    edit: list[tuple[int, str]]  # (entity, relation) in record order
    train: list[tuple[int, str]]
    portability_entities: frozenset[int]
    dev: list[tuple[int, str]] = field(default_factory=list)  # development sequence (lifelong)
    locality_entities: tuple[int, ...] = ()  # the locality pool's entities (lifelong)
    direct_entities: frozenset[int] | None = None  # trained on picture question forms (None: all)

    def derived_trained(self, entity: int) -> bool:
        return entity not in self.portability_entities

    def direct(self, entity: int) -> bool:
        """Whether the model is trained on ``entity``'s paired and image-only questions."""
        return self.direct_entities is None or entity in self.direct_entities


def make_split(world: World, n_edits: int | None = None) -> Split:
    """Choose the edited facts (deterministic in the world's seed and layout)."""
    if world.layout.n_locality_entities:
        return _lifelong_split(world)
    n_edits = DEFAULT_EDITS if n_edits is None else n_edits
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


def _lifelong_split(world: World) -> Split:
    lay = world.layout
    n_ent = len(world.entities)
    rels = [r.key for r in world.relations]
    rng = np.random.default_rng([world.seed, 3])
    order = [int(e) for e in rng.permutation(n_ent)]
    pool = tuple(sorted(order[: lay.n_locality_entities]))
    rest = sorted(order[lay.n_locality_entities:])
    facts = [(e, r) for e in rest for r in rels]
    n_train = len(facts) - lay.n_edits - lay.n_dev if lay.n_train is None else lay.n_train
    if lay.n_edits + lay.n_dev + n_train > len(facts):
        raise ValueError(f"layout {lay.name!r}: {lay.n_edits} + {lay.n_dev} + {n_train} facts do not fit in "
                         f"the {len(facts)} facts of {len(rest)} non-pool entities")
    shuffled = [facts[int(i)] for i in rng.permutation(len(facts))]
    edit = shuffled[: lay.n_edits]
    dev = shuffled[lay.n_edits: lay.n_edits + lay.n_dev]
    train = sorted(shuffled[lay.n_edits + lay.n_dev: lay.n_edits + lay.n_dev + n_train])
    port = frozenset(e for e, r in edit + dev if r == LINK_SOURCE)
    n_direct = max(1, round(lay.direct_share * n_ent))
    direct = frozenset(int(e) for e in rng.permutation(n_ent)[:n_direct])
    return Split(edit, train, port, dev=dev, locality_entities=pool, direct_entities=direct)


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


def _fact(world: World, e: int, rel: str) -> dict[str, Any]:
    """The identity of the fact a probe asks: entity name, relation and, for the derived relation,
    the fact it is computed from."""
    name = world.entities[e].name
    out: dict[str, Any] = {"entity": name, "relation": rel}
    if rel == DERIVED.key:
        out["derived_from"] = [{"entity": name, "relation": LINK_SOURCE}]
    return out


def _probe_fact(world: World, split: Split, e: int, rng: np.random.Generator,
                train_record: bool) -> tuple[int, str]:
    """The (entity, relation) a record's T-Loc or M-Loc probe asks, in two draws of ``rng``.

    Single layout: any other entity's fact. Lifelong layout: a fact of the locality pool, which
    no edit touches, for the sequences' records; for a train record, a train-split fact of
    another entity, so that nothing an offline stage reads names a pool fact the sequences are
    scored on. Every branch makes two draws over more than one choice, so the records' other
    fields (drawn from the same stream) do not depend on which branch ran.
    """
    rels = [r.key for r in world.relations]
    if not split.locality_entities:
        o = int(rng.integers(len(world.entities) - 1))
        return (o + 1 if o >= e else o), rels[int(rng.integers(len(rels)))]
    if not train_record:
        pool = split.locality_entities
        return pool[int(rng.integers(len(pool)))], rels[int(rng.integers(len(rels)))]
    r = rels[int(rng.integers(len(rels)))]
    owners = sorted(o for o, r2 in split.train if r2 == r and o != e)
    return owners[int(rng.integers(len(owners)))], r


def _record(world: World, split: Split, e: int, rel: str, rng: np.random.Generator,
            images: _Images, case_id: int, train_record: bool = False) -> dict[str, Any]:
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
    rels = [r.key for r in world.relations]
    e2, r2 = _probe_fact(world, split, e, rng, train_record)
    q_loc = Question("text", e2, r2, int(rng.integers(3)))
    e3, r3 = _probe_fact(world, split, e, rng, train_record)
    q_mloc = Question("image", e3, r3, int(rng.integers(3)))
    m_loc = images(e3, int(rng.integers(TRAIN_RENDERINGS)))

    fine: list[dict[str, Any]] = []
    other_rels = [r for r in rels if r != rel]
    k = world.layout.fine_relations
    if k is not None and k < len(other_rels):
        other_rels = sorted((other_rels[int(i)] for i in rng.permutation(len(other_rels))[:k]), key=rels.index)
    if rel != LINK_SOURCE and split.derived_trained(e):
        other_rels.append(DERIVED.key)
    for r in other_rels:
        a = answer(world, ent, r)
        for form in ("paired", "text", "image"):
            item: dict[str, Any] = {"prompt": prompt(world, Question(form, e, r, t)), "answer": a,
                                    "form": form, **_fact(world, e, r)}
            if form != "text":
                item["image"] = img
            fine.append(item)
    port: list[dict[str, Any]] = []
    if rel == LINK_SOURCE:
        for form in ("paired", "text", "image"):
            item = {"prompt": prompt(world, Question(form, e, DERIVED.key, t)),
                    "answer": CITY_COUNTRY[alt], "form": form, **_fact(world, e, DERIVED.key)}
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
        "loc_fact": _fact(world, e2, r2),
        "m_loc_fact": _fact(world, e3, r3),
    }


def make_records(world: World, split: Split, which: str, images: _Images) -> list[dict[str, Any]]:
    facts = {"edit": split.edit, "train": split.train, "dev": split.dev}[which]
    rng = np.random.default_rng([world.seed, {"edit": 4, "train": 5, "dev": 9}[which]])
    return [_record(world, split, e, r, rng, images, i, which == "train") for i, (e, r) in enumerate(facts)]


def locality_pool(world: World, split: Split, images: _Images) -> list[dict[str, Any]]:
    """Every fact of the pool's entities in the paired, text-only and image-only forms (one
    training template and rendering each): the probes sequential locality is measured on."""
    rng = np.random.default_rng([world.seed, 10])
    out: list[dict[str, Any]] = []
    for e in split.locality_entities:
        ent = world.entities[e]
        for rel in [r.key for r in world.relations] + [DERIVED.key]:
            t = int(rng.integers(len(world.relation(rel).train_templates)))
            img = images(e, int(rng.integers(TRAIN_RENDERINGS)))
            for form in ("paired", "text", "image"):
                item: dict[str, Any] = {"prompt": prompt(world, Question(form, e, rel, t)),
                                        "answer": answer(world, ent, rel), "form": form, **_fact(world, e, rel)}
                if form != "text":
                    item["image"] = img
                out.append(item)
    return out


def world_summary(world: World, split: Split, n_edits: int) -> dict[str, Any]:
    lay = world.layout
    out = {
        "format_version": FORMAT_VERSION,
        "layout": lay.name,
        "seed": world.seed,
        "n_entities": len(world.entities),
        "n_edits": n_edits,
        "train_renderings": TRAIN_RENDERINGS,
        "heldout_renderings": HELDOUT_RENDERINGS,
        "relations": [r.key for r in world.relations],
        "derived": {DERIVED.key: LINK_SOURCE},
        "entities": [{"name": e.name, "colours": list(e.colours), "shape": e.shape,
                      "pattern": e.pattern, "facts": e.facts,
                      "derived_trained": split.derived_trained(e.index),
                      "direct": split.direct(e.index),
                      "locality_pool": e.index in split.locality_entities} for e in world.entities],
        "city_country": CITY_COUNTRY,
    }
    if lay.n_locality_entities:
        out.update(n_dev=len(split.dev), n_train=len(split.train),
                   locality_entities=[world.entities[e].name for e in split.locality_entities])
    return out


def _dump(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=1, ensure_ascii=False, sort_keys=False) + "\n")


def build(out: str | Path, seed: int = DEFAULT_SEED, n_entities: int | None = None,
          n_edits: int | None = None, layout: str = "single") -> Path:
    """Write the world for ``seed`` and ``layout`` into ``out`` (created if needed); return ``out``.

    ``n_entities`` / ``n_edits`` override the ``single`` layout's sizes (small test worlds); the
    ``lifelong`` layout's sizes are fixed by :data:`~.spec.LAYOUTS`.
    """
    out = Path(out)
    (out / "images").mkdir(parents=True, exist_ok=True)
    world = make_world(seed, n_entities, layout)
    split = make_split(world, n_edits)
    images = _Images(world, out)
    for which in ("edit", "train") + (("dev",) if world.layout.n_dev else ()):
        _dump(make_records(world, split, which, images), out / f"{which}.json")
    if split.locality_entities:
        _dump(locality_pool(world, split, images), out / "locality.json")
    _dump(world_summary(world, split, len(split.edit)), out / "world.json")
    return out
