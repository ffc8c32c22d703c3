"""The four query forms of a fact, as (prompt, answer, has-image) triples.

- ``paired``: picture + question naming the entity;
- ``text``: the same question, no picture;
- ``image``: picture + question about "the thing in the picture";
- ``ident``: picture + "What is this?" -> the entity's name.

The derived relation (``country``) is asked in the first three forms like any relation.
"""

from __future__ import annotations

from dataclasses import dataclass

from .spec import DERIVED, IDENT_HELDOUT, IDENT_TRAIN, THING, Entity, World, form_question

FORMS = ("paired", "text", "image", "ident")
IMAGE_FORMS = ("paired", "image", "ident")


@dataclass(frozen=True)
class Question:
    """One query: its form, entity, relation key (``None`` for ``ident``), template index and
    whether the template is held out."""

    form: str
    entity: int
    relation: str | None
    template: int
    heldout: bool = False

    @property
    def has_image(self) -> bool:
        return self.form in IMAGE_FORMS


def templates(world: World, form: str, relation: str | None, heldout: bool) -> tuple[str, ...]:
    if form == "ident":
        return IDENT_HELDOUT if heldout else IDENT_TRAIN
    if relation is None:
        raise ValueError(f"form {form!r} needs a relation")
    r = world.relation(relation)
    return r.heldout_templates if heldout else r.train_templates


def prompt(world: World, q: Question) -> str:
    """The question text of ``q``."""
    t = templates(world, q.form, q.relation, q.heldout)[q.template]
    if q.form == "ident":
        return t
    e = world.entities[q.entity]
    return form_question(t, THING if q.form == "image" else e.name)


def answer(world: World, entity: Entity, relation: str | None) -> str:
    """The world's answer: the fact, the derived fact, or the name for identification."""
    if relation is None:
        return entity.name
    if relation == DERIVED.key:
        return world.derived(entity)
    return entity.facts[relation]
