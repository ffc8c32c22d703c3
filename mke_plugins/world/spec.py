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
DEFAULT_LAYOUT = "single"
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

#: relations the ``lifelong`` layout adds to the five above (same shape: 8 objects, 3 + 1 templates,
#: each held-out template sharing a cue word with its training templates)
EXTRA_RELATIONS: tuple[Relation, ...] = (
    Relation(
        "job",
        ("baker", "farmer", "miner", "tailor", "sailor", "potter", "hunter", "weaver"),
        ("What job does {n} have?", "Which job does {n} do?", "{n} works in which job?"),
        ("What is the job of {n}?",),
    ),
    Relation(
        "pet",
        ("cat", "dog", "owl", "goat", "horse", "rabbit", "parrot", "snake"),
        ("What pet does {n} keep?", "Which pet does {n} have?", "{n} keeps which pet?"),
        ("Which animal is the pet of {n}?",),
    ),
    Relation(
        "drink",
        ("tea", "milk", "juice", "water", "coffee", "cider", "cocoa", "lemonade"),
        ("What does {n} drink?", "Which drink does {n} like?", "{n} drinks what?"),
        ("What drink is drunk by {n}?",),
    ),
    Relation(
        "tool",
        ("hammer", "saw", "rake", "spade", "axe", "needle", "brush", "ladder"),
        ("What tool does {n} use?", "Which tool does {n} own?", "{n} uses which tool?"),
        ("With which tool does {n} work?",),
    ),
    Relation(
        "vehicle",
        ("boat", "cart", "sled", "bike", "tram", "wagon", "canoe", "ferry"),
        ("What vehicle does {n} ride?", "Which vehicle does {n} drive?", "{n} rides which vehicle?"),
        ("In which vehicle does {n} travel?",),
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
    # the lifelong layout's extra colours (the single layout uses the first 12 only)
    ("grey", (128, 128, 128)), ("navy", (15, 20, 110)), ("olive", (120, 125, 10)),
    ("teal", (0, 120, 120)), ("maroon", (120, 0, 30)), ("lime", (170, 250, 60)),
    ("beige", (220, 200, 150)),
)


@dataclass(frozen=True)
class Layout:
    """How big a world is and how it is split and learnt.

    ``single`` is the bundled single-edit world: every fact of 64 entities outside the 200 edits is
    the train split, and every query form of every fact is trained. ``lifelong`` is sized for long
    edit sequences: entities of a *locality pool* that no edit or train fact touches, an
    acceptance sequence of ``n_edits`` facts, a separate development sequence of ``n_dev`` facts
    and a train split of ``n_train`` facts over the other entities; its model learns facts from
    text, pictures aligned to names, and the picture question forms for a ``direct_share`` of
    the entities only (the rest are answered by composition).
    """

    name: str
    n_entities: int
    n_relations: int
    n_colours: int
    n_edits: int
    n_dev: int = 0
    n_locality_entities: int = 0
    n_train: int | None = None  # None: every fact outside the edit split
    curriculum: str = "forms"  # "forms" (every form of every fact), "composition" or "composition-named"
    direct_share: float = 1.0  # share of entities trained on the paired and image-only forms
    fine_relations: int | None = None  # other relations per fine-locality probe set (None: all)
    train_steps: int = 4000  # `mke-plugins world train` steps of the bundled model

    @property
    def relations(self) -> tuple[Relation, ...]:
        return (RELATIONS + EXTRA_RELATIONS)[: self.n_relations]


LAYOUTS: dict[str, Layout] = {
    "single": Layout("single", DEFAULT_ENTITIES, 5, 12, DEFAULT_EDITS),
    "lifelong": Layout("lifelong", 160, 10, 19, 1000, n_dev=120, n_locality_entities=32, n_train=160,
                       curriculum="composition-named", direct_share=0.25, fine_relations=4,
                       train_steps=12000),
}


def get_layout(name: str | Layout) -> Layout:
    """The layout called ``name`` (a :class:`Layout` passes through)."""
    if isinstance(name, Layout):
        return name
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown world layout {name!r}; known: {sorted(LAYOUTS)}") from None
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
    layout: Layout = field(default_factory=lambda: LAYOUTS[DEFAULT_LAYOUT])

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
def make_world(seed: int = DEFAULT_SEED, n_entities: int | None = None,
               layout: str | Layout = DEFAULT_LAYOUT) -> World:
    """Draw names, visual identities and facts for the layout's entities (or ``n_entities``) from
    ``seed``."""
    lay = get_layout(layout)
    relations = lay.relations
    n_entities = lay.n_entities if n_entities is None else n_entities
    n_colours = lay.n_colours
    n_pairs = n_colours * (n_colours - 1) // 2
    if not 2 <= n_entities <= n_pairs:
        raise ValueError(f"n_entities must be in [2, {n_pairs}] (one unique colour pair each), "
                         f"got {n_entities}")
    rng = np.random.default_rng([seed, 1])
    taken = {o for r in relations + (DERIVED,) for o in r.objects} | set(EXTRA_WORDS)
    names = _make_names(rng, n_entities, taken)
    pairs = [(a, b) for a in range(n_colours) for b in range(a + 1, n_colours)]
    order = rng.permutation(len(pairs))[:n_entities]
    entities = []
    for i, name in enumerate(names):
        e = Entity(i, name, pairs[int(order[i])], int(rng.integers(len(SHAPES))),
                   int(rng.integers(len(PATTERNS))))
        for r in relations:
            e.facts[r.key] = r.objects[int(rng.integers(len(r.objects)))]
        entities.append(e)
    return World(seed, entities, relations, lay)
