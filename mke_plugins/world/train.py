"""Train the world model from scratch on CPU, deterministically for a seed.

Recipe (README, "How the model is trained"): tiny Qwen2-VL (4 layers x 128, 2-block vision tower
of width 64), queries mixed paired : text : image-only : identification = 1 : 1 : 2 : 2 over
training templates and 512 training renderings per entity, loss on the one answer token only,
AdamW lr 2e-3, warm-up then cosine decay, batch 64, gradient clip 1.0. The derived ``country``
question is trained only for entities whose ``lives_in`` fact is not in the edit split.

Determinism: ``torch.manual_seed``, a per-step numpy generator for the data, deterministic
algorithms, and a fixed thread count (results may differ across thread counts and CPUs).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from .build import make_split
from .check import accuracy, check_sets, run_check, sample_items
from .data import PATCH, Encoder, Item, check_against_processor
from .modeling import build_config, build_processor, build_tokenizer, save_processor
from .queries import prompt, templates
from .render import SIZE
from .spec import (
    DEFAULT_SEED,
    DERIVED,
    EXTRA_WORDS,
    IDENT_HELDOUT,
    IDENT_TRAIN,
    THING,
    TRAIN_RENDERINGS,
    Layout,
    form_question,
    get_layout,
    make_world,
    split_words,
)

FORM_WEIGHTS = {"paired": 1, "text": 1, "image": 2, "ident": 2}
#: weight of the named-slot text form in the ``composition-named`` curriculum's text stage (the
#: rest is the text form) and in its tuning stage (beside COMPOSITION_WEIGHTS' forms)
NAMED_TEXT, NAMED_TUNE = 0.7, 1.5
#: the composition curriculum (``lifelong`` layout): facts mostly from text, pictures aligned to
#: names, the picture question forms for the layout's direct entities only
COMPOSITION_WEIGHTS = {"paired": 1, "text": 3, "image": 1.5, "ident": 1.5}
#: curricula: ``forms`` trains every form of every fact; ``composition`` is staged (below);
#: ``composition-named`` adds the named-slot text form (:func:`named_item`) for every entity to the
#: text and tuning stages, and the held-out templates' words (:func:`_unseen_words`) to the noise
CURRICULA = ("forms", "composition", "composition-named")
#: temperature of the CLIP-style picture-to-name alignment term (composition curriculum)
ALIGN_TEMPERATURE = 0.1
#: word-level augmentation of training questions, so held-out phrasings generalise: in
#: AUG_RATE of the questions, each word other than the subject is dropped with WORD_DROP, and
#: one known template word is inserted at a random place with INSERT_RATE
AUG_RATE, WORD_DROP, INSERT_RATE = 0.5, 0.15, 0.5
#: (AUG_RATE, WORD_DROP) of the composition curriculum's text stage, where the facts are learnt:
#: phrasings learnt loosely there carry to held-out templates in every form
TEXT_STAGE_AUG = (0.8, 0.25)


def _template_words(templates: tuple[str, ...]) -> set[str]:
    """Every word of ``templates`` apart from the subject slot."""
    return {w for t in templates for w in split_words(t.replace("{n}", ""))}


def _filler_words(world) -> list[str]:
    """Function words: template words shared by at least three relations (never a cue), and a few more."""
    count: dict[str, int] = {}
    for r in world.relations + (DERIVED,):
        for w in _template_words(r.train_templates):
            count[w] = count.get(w, 0) + 1
    return sorted({w for w, c in count.items() if c >= 3} | {"is", "of", "a", "an"})


def _unseen_words(world) -> list[str]:
    """Words of the vocabulary that no training question, answer or identification prompt uses
    (those of the held-out templates only). Their embedding rows would otherwise stay at
    initialisation, which no pretrained language model has; the ``composition-named`` curriculum
    mixes them into the filler noise of :func:`augment`, so they are known words that cue no relation."""
    seen = set(EXTRA_WORDS) | {"?", ".", ","} | _template_words(IDENT_TRAIN)
    held = _template_words(IDENT_HELDOUT)
    for r in world.relations + (DERIVED,):
        seen |= _template_words(r.train_templates) | set(r.objects)
        held |= _template_words(r.heldout_templates)
    return sorted(held - seen)


def named_item(world, item: Item) -> Item:
    """The named-slot text form of a text item: the subject's name where a picture would stand,
    then the image-only question ("Name : What is the thing in the picture made of?"). Text data
    shaped like a picture question, so that picture tokens aligned to a name are read the way the
    name is (composition), as captioned pictures in an MLLM's text corpus would teach."""
    q = item.question
    t = templates(world, "image", q.relation, False)[q.template]
    return Item(q, None, f"{world.entities[q.entity].name} : {form_question(t, THING)}")


def augment(world, item: Item, rng: np.random.Generator, fillers: list[str],
            rates: tuple[float, float] | None = None) -> Item:
    """``item`` with a randomly thinned / padded question (subject words are kept); ``rates`` is
    (augmented share, word-drop probability), by default (:data:`AUG_RATE`, :data:`WORD_DROP`)."""
    aug_rate, word_drop = rates or (AUG_RATE, WORD_DROP)
    if rng.random() >= aug_rate:
        return item
    q = item.question
    subject = set(split_words(THING)) | {world.entities[q.entity].name}
    words = split_words(prompt(world, q))
    kept = [w for w in words if w in subject or rng.random() >= word_drop]
    if rng.random() < INSERT_RATE:
        kept.insert(int(rng.integers(len(kept) + 1)), fillers[int(rng.integers(len(fillers)))])
    return Item(q, item.rendering, " ".join(kept) if kept else words[-1])


def _weights(spec: str | dict[str, float] | None, known: list[str], what: str, label: str,
             example: str) -> dict[str, float]:
    """The ``KEY=WEIGHT,...`` string (or dict) ``spec`` as a dict; ``ValueError`` for a part that is
    not KEY=WEIGHT or a key outside ``known``."""
    if isinstance(spec, dict):
        given = dict(spec)
    else:
        given = {}
        for part in filter(str.strip, (spec or "").split(",")):
            key, eq, value = part.partition("=")
            try:
                if not eq:
                    raise ValueError
                given[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"{part.strip()!r} is not {label}=WEIGHT (e.g. {example})") from None
    unknown = sorted(set(given) - set(known))
    if unknown:
        raise ValueError(f"unknown {what}s {unknown}; the {what}s are {known}")
    return {k: float(v) for k, v in given.items()}


def form_weights(spec: str | dict[str, float] | None, base: dict[str, float] | None = None) -> dict[str, float]:
    """``FORM_WEIGHTS`` with the forms ``spec`` names reweighted (``"paired=0.25,text=1"`` or a dict)."""
    given = _weights(spec, list(FORM_WEIGHTS), "query form", "FORM", "paired=0.25")
    weights = {**(base or FORM_WEIGHTS), **given}
    if any(w < 0 for w in weights.values()) or not sum(weights.values()) > 0:
        raise ValueError(f"form weights must be >= 0 and not all 0, got {weights}")
    return weights


def with_curriculum(layout: str | Layout, curriculum: str | None) -> Layout:
    """``layout`` trained with ``curriculum`` instead of its own (``None``: its own);
    ``ValueError`` naming the option where that cannot be."""
    lay = get_layout(layout)
    if curriculum is None or curriculum == lay.curriculum:
        return lay
    staged = [c for c in CURRICULA if c != "forms"]
    if curriculum not in staged or lay.curriculum == "forms":
        raise ValueError(f"--curriculum {curriculum!r}: a layout that learns by composition can train with "
                         f"{staged}; the {lay.name} layout trains with {lay.curriculum!r} only")
    return replace(lay, curriculum=curriculum)


def check_variant(forms: str | dict[str, float] | None, n_layers: int | None,
                  layout: str | Layout = "single", stages: str | dict[str, float] | None = None,
                  text_aug: str | tuple[float, float] | None = None) -> dict[str, float]:
    """The form weights of a world variant; ``ValueError`` naming the option for what cannot train."""
    if n_layers is not None and n_layers < 1:
        raise ValueError(f"--layers {n_layers}: need at least 1 decoder layer")
    staged = get_layout(layout).curriculum != "forms"
    for option, value in (("--stages", stages), ("--text-aug", text_aug)):
        if value is not None and not staged:
            raise ValueError(f"{option}: the {get_layout(layout).name} layout trains in one stage; "
                             "only a layout that learns by composition (lifelong) has stages")
    try:
        stage_variant(stages, None)
    except ValueError as exc:
        raise ValueError(f"--stages {stages!r}: {exc}") from None
    try:
        stage_variant(None, text_aug)
    except ValueError as exc:
        raise ValueError(f"--text-aug {text_aug!r}: {exc}") from None
    base = COMPOSITION_WEIGHTS if staged else FORM_WEIGHTS
    try:
        return form_weights(forms, base)
    except ValueError as exc:
        raise ValueError(f"--forms {forms!r}: {exc}") from None


def sample_batch(world, split, seed: int, step: int, batch_size: int,
                 augmented: bool = True, weights: dict[str, float] | None = None,
                 rates: tuple[float, float] | None = None) -> list[Item]:
    """The training batch of ``step`` (a pure function of seed, step, the form weights and the
    augmentation ``rates``, see :func:`augment`).

    Under the composition curriculum the paired and image-only forms ask the split's direct
    entities only.
    """
    rng = np.random.default_rng([seed, 6, step])
    composition = world.layout.curriculum != "forms"
    weights = weights or (COMPOSITION_WEIGHTS if composition else FORM_WEIGHTS)
    direct = [e for e in range(len(world.entities)) if split.direct(e)] if composition else None
    forms = list(weights)
    p = np.array([weights[f] for f in forms], dtype=np.float64)
    picks = rng.choice(len(forms), size=batch_size, p=p / p.sum())
    fillers = _filler_words(world)
    if world.layout.curriculum == "composition-named":
        fillers = sorted(set(fillers) | set(_unseen_words(world)))
    items: list[Item] = []
    for k in picks:
        form = forms[int(k)]
        if form == "named":  # never augmented (augmenting it: 6 failing floor sets instead of 2, seed 0)
            items.append(named_item(world, sample_items(world, split, rng, "text", 1)[0]))
            continue
        item = sample_items(world, split, rng, form, 1,
                            entities=direct if form in ("paired", "image") else None)[0]
        items.append(augment(world, item, rng, fillers, rates) if augmented else item)
    return items


class _Alignment:
    """Pictures aligned to names: captures the merged picture tokens of each forward and scores
    them against the input embeddings of every entity's name, CLIP-style (cross-entropy of the
    cosine similarities at temperature :data:`ALIGN_TEMPERATURE`, plus one minus the cosine to the
    right name): the stand-in for an MLLM's projector pre-training, which maps pictures into the
    word-embedding space."""

    def __init__(self, model: Any, enc: Encoder, world: Any) -> None:
        self.model, self.enc, self.world = model, enc, world
        self.embed = model.get_input_embeddings()
        self.name_ids = torch.tensor([enc.target_id(e.name) for e in world.entities])
        self.per_image = enc.n_image_tokens
        self.out: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self._capture)

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        self.out = output.pooler_output

    def _score(self, tokens: torch.Tensor, ents: list[int]) -> torch.Tensor:
        names = torch.nn.functional.normalize(self.embed.weight[self.name_ids].detach(), dim=-1)
        toks = torch.nn.functional.normalize(tokens.view(len(ents), self.per_image, -1), dim=-1)
        sims = toks @ names.T  # (images, tokens, entities)
        target = torch.tensor(ents).repeat_interleave(self.per_image)
        ce = torch.nn.functional.cross_entropy(sims.reshape(-1, sims.shape[-1]) / ALIGN_TEMPERATURE, target)
        right = sims.gather(-1, torch.tensor(ents).view(-1, 1, 1).expand(-1, self.per_image, 1))
        return ce + (1 - right).mean()

    def loss(self, items: list[Item]) -> torch.Tensor:
        """The term for the pictures of the batch just run (zero when it had none)."""
        ents = [it.question.entity for it in items if it.question.has_image]
        out, self.out = self.out, None
        if not ents or out is None:
            return torch.zeros(())
        return self._score(out, ents)

    def pictures(self, seed: int, step: int, batch_size: int) -> torch.Tensor:
        """The term on a batch of training renderings of random entities (vision tower only)."""
        rng = np.random.default_rng([seed, 11, step])
        ents = [int(e) for e in rng.integers(len(self.world.entities), size=batch_size)]
        pics = [self.enc.picture(e, int(rng.integers(TRAIN_RENDERINGS))) for e in ents]
        g = SIZE // PATCH
        pix = self.enc.patchify(pics)
        self.model.model.visual(pix, grid_thw=torch.tensor([[1, g, g]] * len(pics)))
        out, self.out = self.out, None
        return self._score(out, ents)


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))


@dataclass(frozen=True)
class Stage:
    """One stage of a curriculum: its share of the steps, its query-form mix (``None``: picture
    batches for the alignment term only), what it trains, its learning-rate scale, the weight
    of the picture-to-name alignment term and its word augmentation (``None``: the default
    rates; else (share augmented, word-drop probability), see :func:`augment`)."""

    name: str
    share: float
    weights: dict[str, float] | None
    trainable: str  # "all", "vision" (the vision tower and merger) or "language" (everything else)
    lr_scale: float = 1.0
    align: float = 0.0
    augment: tuple[float, float] | None = None


#: the composition curriculum, staged the way MLLMs are trained: facts from text (language-model
#: pre-training), then pictures aligned to names with the language model frozen (projector
#: pre-training), then every question form with the picture forms for direct entities only and
#: the vision tower frozen (instruction tuning), so that the picture questions are answered by
#: routing name-like picture tokens into the facts learnt from text, not by memorising pictures.
#: 3,000 / 5,500 / 3,500 of the bundled model's 12,000 steps, the text stage with stronger word
#: augmentation (:data:`TEXT_STAGE_AUG`): a long alignment stage lifts composed picture questions,
#: a long tuning stage keeps entities apart at the last layer, the augmentation carries phrasings
#: to held-out templates (world README, "How the recipe was found"). ``world train --stages``
#: / ``--text-aug`` reshare the stages and set the text stage's augmentation for world variants
#: (:func:`stage_variant`)
COMPOSITION_STAGES = (
    Stage("text", 3 / 12, {"text": 1.0}, "all", augment=TEXT_STAGE_AUG),
    Stage("align", 5.5 / 12, None, "vision", align=1.0),
    Stage("tune", 3.5 / 12, COMPOSITION_WEIGHTS, "language", lr_scale=0.5),
)


def stage_variant(stages: str | dict[str, float] | None = None,
                  text_aug: str | tuple[float, float] | None = None) -> tuple[Stage, ...]:
    """:data:`COMPOSITION_STAGES` with the shares ``stages`` gives (``"text=30,align=55,tune=15"``
    or a dict; weights of every stage, normalised by their sum) and the text stage's word
    augmentation ``text_aug`` (``"0.8,0.25"``: share of questions augmented, word-drop
    probability). ``ValueError`` saying what is wrong."""
    out = list(COMPOSITION_STAGES)
    if stages is not None:
        names = [s.name for s in out]
        given = _weights(stages, names, "stage", "STAGE", "text=30,align=55,tune=15")
        if sorted(k for k, v in given.items() if v > 0) != sorted(names):
            raise ValueError(f"give every stage a weight above 0: {names} (got {stages!r})")
        total = sum(given.values())
        out = [replace(s, share=given[s.name] / total) for s in out]
    if text_aug is not None:
        try:
            rates = tuple(float(x) for x in text_aug.split(",")) if isinstance(text_aug, str) else tuple(text_aug)
        except ValueError:
            rates = ()
        if len(rates) != 2 or not all(0.0 <= r <= 1.0 for r in rates):
            raise ValueError(f"{text_aug!r} is not RATE,DROP with both in [0, 1] (e.g. 0.8,0.25)")
        out[0] = replace(out[0], augment=(rates[0], rates[1]))
    return tuple(out)


def _stages(world: Any, weights: dict[str, float],
            composition: tuple[Stage, ...] = COMPOSITION_STAGES) -> tuple[Stage, ...]:
    if world.layout.curriculum == "forms":
        return (Stage("forms", 1.0, weights, "all"),)
    stages = [replace(s, weights=weights) if s.name == "tune" else s for s in composition]
    if world.layout.curriculum == "composition-named":
        stages[0] = replace(stages[0], weights={"text": 1.0 - NAMED_TEXT, "named": NAMED_TEXT})
        stages[-1] = replace(stages[-1], weights={**weights, "named": NAMED_TUNE})
    return tuple(stages)


def _optimizer(model: Any, trainable: str, lr: float) -> torch.optim.Optimizer:
    def visual(name: str) -> bool:
        return name.startswith(("model.visual.", "visual."))

    named = [(n, p) for n, p in model.named_parameters()
             if trainable == "all" or (trainable == "vision") == visual(n)]
    for p in model.parameters():
        p.requires_grad_(False)
    for _, p in named:
        p.requires_grad_(True)
    decay = [p for n, p in named if p.ndim >= 2 and "embed" not in n]
    no_decay = [p for n, p in named if not (p.ndim >= 2 and "embed" not in n)]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.98))


def train(out: str | Path, seed: int = DEFAULT_SEED, steps: int = 4000, batch_size: int = 64,
          lr: float = 2e-3, warmup: int = 200, threads: int = 1, eval_every: int = 500,
          log: Callable[[str], None] = print, n_entities: int | None = None,
          check: bool = True, forms: str | dict[str, float] | None = None,
          n_layers: int | None = None, layout: str = "single", curriculum: str | None = None,
          stages: str | dict[str, float] | None = None,
          text_aug: str | tuple[float, float] | None = None) -> dict[str, Any]:
    """Train, save with ``save_pretrained`` into ``out`` and return its metadata (with the
    final check report under ``check`` unless ``check=False``).

    ``forms`` reweights the query-form mix (:func:`form_weights`), ``n_layers`` sets the
    decoder depth, ``curriculum`` picks another staged curriculum (:data:`CURRICULA`) for a
    layout that learns by composition, and ``stages`` / ``text_aug`` reshare its stages and set
    its text stage's word augmentation (:func:`stage_variant`): all exist to train world
    *variants*; the bundled model uses the defaults, and the metadata records what was used. A
    layout with the composition curriculum trains in :data:`COMPOSITION_STAGES` (``forms``
    reweights its last stage).
    """
    layout = with_curriculum(layout, curriculum)
    weights = check_variant(forms, n_layers, layout, stages, text_aug)
    from transformers import Qwen2VLForConditionalGeneration

    torch.set_num_threads(threads)
    torch.set_flush_denormal(True)
    torch.use_deterministic_algorithms(True, warn_only=True)
    out = Path(out)
    world = make_world(seed, n_entities, layout)
    split = make_split(world)
    tok = build_tokenizer(world.vocabulary())
    processor = build_processor(tok)
    enc = Encoder(world, processor)
    check_against_processor(enc, [it for it in sample_batch(world, split, seed + 1, 0, 8, augmented=False)
                                  if it.text is None])

    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(build_config(tok, n_layers))
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    log(f"world model: {n_params} parameters, vocab {len(tok)}, {steps} steps x {batch_size}")
    probe = {k: v for k, v in check_sets(world, split, 64, seed_offset=8).items()}
    stages = _stages(world, weights, stage_variant(stages, text_aug))
    align = _Alignment(model, enc, world) if any(s.align for s in stages) else None
    t0 = time.time()
    running = 0.0
    step = 0
    for k, stage in enumerate(stages):
        n = steps - step if k == len(stages) - 1 else int(round(stage.share * steps))
        if len(stages) > 1:
            log(f"stage {stage.name}: {n} steps, trains {stage.trainable}")
        opt = _optimizer(model, stage.trainable, lr * stage.lr_scale)
        stage_warmup = warmup if len(stages) == 1 else min(warmup, max(1, n // 10))
        for local in range(n):
            rate = lr_at(local, n, lr * stage.lr_scale, stage_warmup)
            for g in opt.param_groups:
                g["lr"] = rate
            if stage.weights is None:
                loss = align.pictures(seed, step, batch_size)
            else:
                items = sample_batch(world, split, seed, step, batch_size, weights=stage.weights,
                                     rates=stage.augment)
                b = enc.encode(items)
                tids = b.pop("target_ids")
                logits = model(**b, logits_to_keep=2).logits[:, 0]
                loss = torch.nn.functional.cross_entropy(logits.float(), tids)
                if align is not None:  # the term is scored only where it is trained; the capture is dropped
                    if stage.align:
                        loss = loss + stage.align * align.loss(items)
                    align.out = None
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
            opt.step()
            lv = float(loss.detach())
            running = 0.98 * running + 0.02 * lv if step else lv
            step += 1
            if step % 50 == 0:
                log(f"step {step} loss {running:.4f} lr {rate:.2e} {time.time() - t0:.0f}s")
            if eval_every and step % eval_every == 0 and step < steps:
                accs = {k: round(accuracy(model, enc, v), 3) for k, v in probe.items()}
                log(f"eval step {step}: {json.dumps(accs)}")
    for p in model.parameters():
        p.requires_grad_(True)
    model.eval()
    elapsed = time.time() - t0
    log(f"trained in {elapsed:.0f}s")
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config.pad_token_id = tok.pad_token_id
    model.save_pretrained(out, safe_serialization=True)
    save_processor(processor, out)
    report = run_check(model, processor, world, split) if check else None
    meta = {"seed": seed, "steps": steps, "batch_size": batch_size, "lr": lr, "warmup": warmup,
            "threads": threads, "n_entities": len(world.entities), "layout": world.layout.name,
            "curriculum": world.layout.curriculum, "parameters": n_params,
            "stages": [{"name": s.name, "share": s.share, "forms": s.weights, "trains": s.trainable,
                        "lr_scale": s.lr_scale, "align": s.align, "augment": s.augment}
                       for s in stages] if len(stages) > 1 else None,
            "form_weights": weights, "decoder_layers": model.config.text_config.num_hidden_layers,
            "train_seconds": round(elapsed, 1), "check": report}
    (out / "world_model.json").write_text(json.dumps(meta, indent=2) + "\n")
    return meta
