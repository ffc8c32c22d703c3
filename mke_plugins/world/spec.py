"""The synthetic world's content: entities, relations, templates, facts and the vocabulary.

Everything here is a pure function of the seed, so the world, its records and the vocabulary of
the model trained on it can always be rebuilt. Pictures are drawn in :mod:`.render`; edit cases
and files are made in :mod:`.build`. The fixed parts (relations, objects, templates) do not
depend on the seed; names, visual identities and facts do.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import lru_cache

import numpy as np

DEFAULT_SEED = 0
DEFAULT_ENTITIES = 64
DEFAULT_EDITS = 200
#: renderings 0..TRAIN_RENDERINGS-1 are for training; the next HELDOUT_RENDERINGS are held out
TRAIN_RENDERINGS = 512
HELDOUT_RENDERINGS = 64

THING = "the thing in the picture"


@dataclass(frozen=True)
class Relation:
    """A relation: its object vocabulary and its question templates (``{n}`` names the subject)."""

    key: str
    objects: tuple[str, ...]
    train_templates: tuple[str, ...]
    heldout_templates: tuple[str, ...]


RELATIONS: tuple[Relation, ...] = (
    Relation(
        "made_of",
        ("wood", "stone", "glass", "metal", "paper", "clay", "silk", "wax"),
        ("What is {n} made of?", "What material is {n} made of?", "{n} is made of what?"),
        ("Which material makes up {n}?",),
    ),
    Relation(
        "lives_in",
        ("Alder", "Brask", "Corvin", "Dunmere", "Eskby", "Fallow", "Gorse", "Hollin"),
        ("Where does {n} live?", "In which city does {n} live?", "{n} lives in which city?"),
        ("What city is home to {n}?",),
    ),
    Relation(
        "eats",
        ("apples", "fish", "rice", "bread", "honey", "grass", "seeds", "cheese"),
        ("What does {n} eat?", "Which food does {n} eat?", "{n} eats what?"),
        ("What food is eaten by {n}?",),
    ),
    Relation(
        "sport",
        ("tennis", "chess", "rowing", "golf", "karate", "hockey", "boxing", "archery"),
        ("What sport does {n} play?", "Which sport does {n} like?", "{n} plays which sport?"),
        ("What is the favourite sport of {n}?",),
    ),
    Relation(
        "instrument",
        ("drum", "flute", "harp", "violin", "piano", "guitar", "horn", "lute"),
        ("What instrument does {n} play?", "Which instrument does {n} own?",
         "{n} plays which instrument?"),
        ("On which instrument does {n} make music?",),
    ),
)

#: the relation the derived one is computed from, and the fixed table that links them
LINK_SOURCE = "lives_in"
CITY_COUNTRY: dict[str, str] = {
    "Alder": "Norland", "Brask": "Norland", "Corvin": "Sudmark", "Dunmere": "Sudmark",
    "Eskby": "Westerra", "Fallow": "Westerra", "Gorse": "Ostlund", "Hollin": "Ostlund",
}
DERIVED = Relation(
    "country",
    ("Norland", "Sudmark", "Westerra", "Ostlund"),
    ("Which country does {n} live in?", "In which country does {n} live?",
     "{n} lives in which country?"),
    ("What country is home to {n}?",),
)

IDENT_TRAIN = ("What is this?", "Who is this?", "Name the thing in the picture.")
IDENT_HELDOUT = ("Name this thing.",)

#: words that EasyEdit's own code wraps around prompts (trainer collate), so they are not UNK
EXTRA_WORDS = ("Question", "Short", "answer", "user", "assistant", "system", ":", ".", ",", "?",
               "a", "an", "is", "the", "of", "what", "What")

COLOURS: tuple[tuple[str, tuple[int, int, int]], ...] = (
    ("red", (220, 30, 30)), ("green", (30, 170, 40)), ("blue", (40, 60, 225)),
    ("yellow", (245, 225, 30)), ("cyan", (30, 215, 225)), ("magenta", (215, 40, 205)),
    ("orange", (250, 140, 20)), ("purple", (115, 35, 160)), ("white", (250, 250, 250)),
    ("black", (12, 12, 12)), ("brown", (120, 70, 20)), ("pink", (250, 160, 195)),
)
SHAPES = ("circle", "square", "triangle", "diamond", "hexagon", "star")
PATTERNS = ("stripes", "dots", "half", "ring")

_ONSETS = ("b", "d", "f", "g", "k", "l", "m", "n", "p", "r", "s", "t", "v", "z", "br", "dr",
           "gr", "kl", "tr", "th", "sh", "st")
_VOWELS = ("a", "e", "i", "o", "u", "ae", "ou", "y")
_CODAS = ("", "", "", "n", "r", "l", "s", "x", "th", "m")


def form_question(template: str, subject: str) -> str:
    """Fill ``{n}``; a subject that starts the sentence gets a capital letter."""
    if template.startswith("{n}"):
        subject = subject[:1].upper() + subject[1:]
    return template.replace("{n}", subject)


@dataclass
class Entity:
    """One made-up thing: its name, its visual identity and its facts."""

    index: int
    name: str
    colours: tuple[int, int]  # indices into COLOURS; unique unordered pair per entity
    shape: int
    pattern: int
    facts: dict[str, str] = field(default_factory=dict)


@dataclass
class World:
    """A generated world (see :func:`make_world`)."""

    seed: int
    entities: list[Entity]
    relations: tuple[Relation, ...] = RELATIONS

    def relation(self, key: str) -> Relation:
        for r in self.relations + (DERIVED,):
            if r.key == key:
                return r
        raise KeyError(f"unknown relation {key!r}; known: {[r.key for r in self.relations]} + country")

    def derived(self, entity: Entity) -> str:
        return CITY_COUNTRY[entity.facts[LINK_SOURCE]]

    def vocabulary(self) -> list[str]:
        """Every word the world's texts can contain, in a fixed order (the tokenizer's vocab)."""
        words: list[str] = []
        seen: set[str] = set()

        def add(text: str) -> None:
            for w in split_words(text):
                if w not in seen:
                    seen.add(w)
                    words.append(w)

        for w in EXTRA_WORDS:
            add(w)
        for r in self.relations + (DERIVED,):
            for t in r.train_templates + r.heldout_templates:
                add(form_question(t, THING))
                add(form_question(t, "X"))
            for o in r.objects:
                add(o)
        for t in IDENT_TRAIN + IDENT_HELDOUT:
            add(t)
        for e in self.entities:
            add(e.name)
        seen.discard("X")
        return [w for w in words if w != "X"]


PUNCT = "?.,:!;"


def split_words(text: str) -> list[str]:
    """Split like the world tokenizer's pre-tokenizer: whitespace, punctuation isolated."""
    out: list[str] = []
    for chunk in text.split():
        cur = ""
        for ch in chunk:
            if ch in PUNCT:
                if cur:
                    out.append(cur)
                out.append(ch)
                cur = ""
            else:
                cur += ch
        if cur:
            out.append(cur)
    return out


def _make_names(rng: np.random.Generator, n: int, taken: set[str]) -> list[str]:
    names: list[str] = []
    used = {t.lower() for t in taken}
    while len(names) < n:
        k = int(rng.integers(2, 4))
        parts = []
        for _ in range(k):
            parts.append(_ONSETS[rng.integers(len(_ONSETS))] + _VOWELS[rng.integers(len(_VOWELS))])
        name = ("".join(parts) + _CODAS[rng.integers(len(_CODAS))]).capitalize()
        if 4 <= len(name) <= 10 and name.lower() not in used:
            used.add(name.lower())
            names.append(name)
    return names


@lru_cache(maxsize=8)
def make_world(seed: int = DEFAULT_SEED, n_entities: int = DEFAULT_ENTITIES) -> World:
    """Draw names, visual identities and facts for ``n_entities`` entities from ``seed``."""
    n_pairs = len(COLOURS) * (len(COLOURS) - 1) // 2
    if not 2 <= n_entities <= n_pairs:
        raise ValueError(f"n_entities must be in [2, {n_pairs}] (one unique colour pair each), "
                         f"got {n_entities}")
    rng = np.random.default_rng([seed, 1])
    taken = {o for r in RELATIONS + (DERIVED,) for o in r.objects} | set(EXTRA_WORDS)
    names = _make_names(rng, n_entities, taken)
    pairs = [(a, b) for a in range(len(COLOURS)) for b in range(a + 1, len(COLOURS))]
    order = rng.permutation(len(pairs))[:n_entities]
    entities = []
    for i, name in enumerate(names):
        e = Entity(i, name, pairs[int(order[i])], int(rng.integers(len(SHAPES))),
                   int(rng.integers(len(PATTERNS))))
        for r in RELATIONS:
            e.facts[r.key] = r.objects[int(rng.integers(len(r.objects)))]
        entities.append(e)
    return World(seed, entities)
