"""The lifelong world layout: a locality pool no edit touches, disjoint acceptance, development
and train facts, probe identities on every record, and the composition curriculum's sampling."""

from __future__ import annotations

import json
from functools import lru_cache

import numpy as np
import pytest

from mke_plugins.world.build import _Images, locality_pool, make_records, make_split
from mke_plugins.world.spec import DERIVED, LAYOUTS, LINK_SOURCE, make_world
from mke_plugins.world.train import sample_batch

LAY = LAYOUTS["lifelong"]


@lru_cache(maxsize=2)
def _world(seed: int = 0):
    w = make_world(seed, None, "lifelong")
    split = make_split(w)
    images = _Images(w, None)  # paths only, no PNGs written
    recs = {k: make_records(w, split, k, images) for k in ("edit", "dev", "train")}
    return w, split, recs, locality_pool(w, split, images)


def _touched_by(facts: set[tuple[str, str]], probe: dict) -> bool:
    own = (probe["entity"], probe["relation"])
    return own in facts or any((d["entity"], d["relation"]) in facts for d in probe.get("derived_from", []))


def test_splits_are_disjoint_and_sized_for_a_thousand_edits():
    w, split, recs, pool = _world()
    assert len(w.entities) == LAY.n_entities and len(w.relations) == LAY.n_relations
    assert len(split.edit) == len(set(split.edit)) >= 1000
    assert len(split.dev) == LAY.n_dev and len(split.train) == LAY.n_train
    edit, dev, train = set(split.edit), set(split.dev), set(split.train)
    assert not edit & dev and not edit & train and not dev & train
    pool_ents = set(split.locality_entities)
    assert len(pool_ents) == LAY.n_locality_entities
    assert not pool_ents & {e for e, _ in edit | dev | train}
    assert len({(p["entity"], p["relation"]) for p in pool}) >= 300
    assert {p["form"] for p in pool} == {"paired", "text", "image"}
    # entities whose city is edited in either sequence never learn their country
    assert split.portability_entities == {e for e, r in edit | dev if r == LINK_SOURCE}
    # colour pairs stay unique identities
    assert len({e.colours for e in w.entities}) == len(w.entities)


def test_no_locality_probe_of_the_acceptance_sequence_is_touched_by_it():
    w, split, recs, _ = _world()
    seq = recs["edit"]
    edited = {(r["entity"], r["relation"]) for r in seq}
    assert len(edited) == len(seq) == 1000
    pool_names = {w.entities[e].name for e in split.locality_entities}
    for r in seq:
        for key in ("loc_fact", "m_loc_fact"):
            assert r[key]["entity"] in pool_names
            assert not _touched_by(edited, r[key])
    # fine-grained probes whose fact another edit changes exist, and every probe names its fact
    fine = [x for r in seq for x in r["fine_locality"]]
    touched = [x for x in fine if _touched_by(edited, x)]
    assert fine and 0 < len(touched) < len(fine)
    for r in seq:
        for x in r["fine_locality"] + r["portability"]:
            assert x["entity"] == r["entity"] and x["relation"]
            if x["relation"] == DERIVED.key:
                assert x["derived_from"] == [{"entity": r["entity"], "relation": LINK_SOURCE}]


def test_train_records_probe_train_facts_only():
    """What an offline stage reads (train.json) names no fact of the pool or of either sequence."""
    w, split, recs, pool = _world()
    train = {(w.entities[e].name, r) for e, r in split.train}
    scored = {(p["entity"], p["relation"]) for p in pool}
    scored |= {(x["entity"], x["relation"]) for k in ("edit", "dev") for x in recs[k]}
    for r in recs["train"]:
        for key in ("loc_fact", "m_loc_fact"):
            fact = (r[key]["entity"], r[key]["relation"])
            assert fact in train and fact not in scored and r[key]["entity"] != r["entity"]
    # the sequences' records still ask the pool, whose facts train.json never names
    assert all(r["loc_fact"]["entity"] in {p["entity"] for p in pool} for r in recs["edit"][:50])


def test_records_carry_probe_identities_that_match_their_answers():
    w, split, recs, pool = _world()
    by_name = {e.name: e for e in w.entities}
    for r in recs["dev"][:50] + recs["train"][:50]:
        e2, e3 = by_name[r["loc_fact"]["entity"]], by_name[r["m_loc_fact"]["entity"]]
        assert e2.name in r["loc"] and e2.facts[r["loc_fact"]["relation"]] == r["loc_ans"]
        assert e3.facts[r["m_loc_fact"]["relation"]] == r["m_loc_a"]
        assert len({x["relation"] for x in r["fine_locality"]} - {DERIVED.key}) == LAY.fine_relations
    for p in pool[:60]:
        ent = by_name[p["entity"]]
        want = w.derived(ent) if p["relation"] == DERIVED.key else ent.facts[p["relation"]]
        assert p["answer"] == want


def test_composition_curriculum_asks_picture_questions_of_direct_entities_only():
    w, split, _, _ = _world()
    direct = {e for e in range(len(w.entities)) if split.direct(e)}
    assert 0 < len(direct) < len(w.entities)
    seen_forms, composed_text = set(), 0
    for step in range(6):
        for item in sample_batch(w, split, 0, step, 64):
            q = item.question
            seen_forms.add(q.form)
            if q.form in ("paired", "image"):
                assert q.entity in direct
            elif q.form == "text" and q.entity not in direct:
                composed_text += 1
    assert seen_forms == {"paired", "text", "image", "ident"} and composed_text > 0


def test_composition_named_curriculum_trains_named_slots_and_unseen_words_as_noise():
    from mke_plugins.world.queries import Question, prompt
    from mke_plugins.world.spec import THING
    from mke_plugins.world.train import (
        NAMED_TEXT,
        _filler_words,
        _stages,
        _unseen_words,
        augment,
        named_item,
        with_curriculum,
    )

    w, split, _, _ = _world()
    unseen = _unseen_words(w)
    trained = {x for r in w.relations + (DERIVED,) for t in r.train_templates for x in t.split()}
    assert unseen and "material" not in unseen and not set(unseen) & trained
    assert not set(unseen) & set(_filler_words(w))  # the plain curricula's noise stays as it was
    # the named slot: the name, then the image-only question, as text (no picture)
    item = named_item(w, sample_batch(w, split, 0, 0, 1, weights={"text": 1.0})[0])
    q = item.question
    image_q = prompt(w, Question("image", q.entity, q.relation, q.template))
    assert item.rendering is None and not q.has_image and THING in item.text.lower()
    assert item.text == f"{w.entities[q.entity].name} : {image_q}"
    # only the composition-named curriculum (the lifelong layout's own) trains it, in its text and
    # tuning stages, for every entity
    plain = make_world(0, None, with_curriculum("lifelong", "composition"))
    assert all("named" not in (st.weights or {}) for st in _stages(plain, {"text": 1.0}))
    wn = make_world(0, None, with_curriculum("lifelong", "composition-named"))
    assert LAY.curriculum == "composition-named"
    text_stage, *_, tune = _stages(wn, {"text": 1.0})
    assert "named" in text_stage.weights and "named" in tune.weights
    batch = sample_batch(wn, split, 0, 1, 256, weights=text_stage.weights)
    named = [it for it in batch if it.text and " : " in it.text]
    direct = {e for e in range(len(w.entities)) if split.direct(e)}
    assert abs(len(named) - NAMED_TEXT * 256) < 40 and {it.question.entity for it in named} - direct
    # an unseen word can be inserted as noise, and the subject always survives
    rng = np.random.default_rng(0)
    noisy = [augment(w, it, rng, unseen) for it in sample_batch(w, split, 0, 2, 200, augmented=False)]
    assert any(x in (it.text or "") for it in noisy for x in unseen)
    with pytest.raises(ValueError, match="--curriculum"):
        with_curriculum("single", "composition-named")


def test_stage_variants_reshare_the_stages_and_thin_the_text_stage():
    """``world train --stages / --text-aug``: the composition curriculum's stages reshared (weights
    normalised) and its text stage trained with stronger word augmentation (``Stage.augment``),
    which ``sample_batch`` passes to ``augment``; the bundled recipe is the default; bad values and
    a one-stage layout are refused naming the option."""
    from mke_plugins.world.spec import split_words
    from mke_plugins.world.train import (
        AUG_RATE,
        COMPOSITION_STAGES,
        TEXT_STAGE_AUG,
        WORD_DROP,
        _stages,
        check_variant,
        prompt,
        stage_variant,
    )

    w, split, _, _ = _world()
    assert stage_variant() == COMPOSITION_STAGES
    assert COMPOSITION_STAGES[0].augment == TEXT_STAGE_AUG
    assert TEXT_STAGE_AUG[0] > AUG_RATE and TEXT_STAGE_AUG[1] > WORD_DROP
    text_stage, align, tune = _stages(w, {"text": 1.0}, stage_variant("text=30, align=55, tune=15", "0.5,0.15"))
    assert [s.share for s in (text_stage, align, tune)] == [0.3, 0.55, 0.15]
    assert text_stage.augment == (0.5, 0.15) and tune.augment is None and align.weights is None
    assert "named" in text_stage.weights  # the curriculum's own text-stage mix is kept
    shares = [s.share for s in stage_variant({"text": 3000, "align": 5500, "tune": 3500})]
    assert shares == [0.25, 5500 / 12000, 3500 / 12000]

    def n_words(batch):
        return sum(len(split_words(it.text if it.text is not None else prompt(w, it.question))) for it in batch)

    def batch(rates, augmented=True):
        return sample_batch(w, split, 0, 3, 400, weights={"text": 1.0}, rates=rates, augmented=augmented)

    plain = batch(None, augmented=False)
    assert [it.text for it in batch((0.0, 1.0))] == [it.text for it in plain]  # nothing augmented
    assert n_words(batch(TEXT_STAGE_AUG)) < n_words(batch(None)) < n_words(plain)
    for stages, aug, says in [("text=1,align=1", None, "--stages.*every stage"), ("txt=1", None, "unknown stages"),
                              ("text=1,align=x,tune=1", None, "STAGE=WEIGHT"), (None, "0.8", "--text-aug.*RATE,DROP"),
                              (None, "0.8,1.5", "RATE,DROP")]:
        with pytest.raises(ValueError, match=says):
            check_variant(None, None, "lifelong", stages, aug)
    with pytest.raises(ValueError, match="--text-aug: the single layout trains in one stage"):
        check_variant(None, None, "single", None, "0.8,0.25")


def test_lifelong_layout_is_a_pure_function_of_the_seed():
    a = make_split(make_world(0, None, "lifelong"))
    b = make_split(make_world(1, None, "lifelong"))
    assert a.edit != b.edit
    again = make_split(make_world(0, None, "lifelong"))
    assert a.edit == again.edit and a.dev == again.dev and a.locality_entities == again.locality_entities
    assert np.array_equal(sorted(a.direct_entities), sorted(again.direct_entities))


def test_the_bench_plans_the_thousand_edit_sequence_without_locality_collisions(tmp_path):
    """The bench's collision rule on the full acceptance sequence: no T-Loc / M-Loc probe is refused,
    and exactly the fine-grained probes whose fact another edit changes become cross-edit probes."""
    import json

    from mke_plugins import world as world_pkg
    from mke_plugins.bench.collisions import plan_sequence

    _, _, recs, _ = _world()
    (tmp_path / "edit.json").write_text(json.dumps(recs["edit"]))
    reqs = world_pkg.record_paths("edit", tmp_path)
    plan = plan_sequence(reqs, list(range(len(reqs))))  # raises on a touched T-Loc / M-Loc probe
    assert not plan.repeated and not plan.anonymous_edits and not plan.unchecked
    edited = {(r["entity"], r["relation"]) for r in recs["edit"]}
    want = sum(_touched_by(edited, x) for r in recs["edit"] for x in r["fine_locality"])
    want += sum(_touched_by(edited - {(r["entity"], r["relation"])}, x)
                for r in recs["edit"] for x in r["portability"])
    assert plan.n_touched == want > 0
    assert {t.kind for p in plan.plans for t in p.touched} <= {"fine_locality", "portability"}


def test_bundled_lifelong_model_knows_its_facts_from_text():
    """The bundled lifelong model answers its trained forms, and its recorded ``world check`` (512
    queries per set) met the whole floor, composed picture questions and held-out sets included."""
    from mke_plugins import world as world_pkg
    from mke_plugins.world.check import run_check

    meta = json.loads((world_pkg.model_path("lifelong") / "world_model.json").read_text())
    assert meta["layout"] == "lifelong" and meta["seed"] == 0 and meta["steps"] == LAY.train_steps
    assert meta["curriculum"] == LAY.curriculum and meta["check"]["floor_met"] and meta["check"]["n_per_set"] == 512
    model, proc = world_pkg.load(world_pkg.model_path("lifelong"))
    w = make_world(0, None, "lifelong")
    report = run_check(model, proc, w, make_split(w), n=64)
    acc = report["accuracy"]
    assert acc["trained/text"] >= 0.95 and acc["trained/paired"] >= 0.95
    assert {"composed/paired", "composed/image"} <= set(acc)
    per_relation = report["heldout_template_by_relation"]
    assert set(per_relation) == {"paired", "text", "image"}
    for rels in per_relation.values():
        assert set(rels) <= {r.key for r in w.relations} | {"country"} and len(rels) >= 8
        assert all(0.0 <= a <= 1.0 for a in rels.values())


def test_heldout_templates_are_broken_down_by_relation():
    """``by_relation`` is the accuracy of each relation's items; identification items ask none."""
    from mke_plugins.world.check import by_relation
    from mke_plugins.world.data import Item
    from mke_plugins.world.queries import Question

    items = [Item(Question("text", 0, "eats", 0, True), None), Item(Question("text", 1, "eats", 0, True), None),
             Item(Question("text", 0, "pet", 0, True), None), Item(Question("ident", 0, None, 0, True), 3)]
    assert by_relation(items, [True, False, True, False]) == {"eats": 0.5, "pet": 1.0}


def test_bench_runs_a_lifelong_sequence_with_checkpoints():
    from mke_plugins.bench.runner import BenchConfig, methods_from, run_bench

    out = run_bench(BenchConfig(methods=methods_from("FT"), cases=4, mode="sequential", checkpoints=[1, 4],
                                world="lifelong", hparams="lifelong", generate=False, progress=False))
    row = out["methods"]["FT"]
    assert [p["T"] for p in row["curve"]] == [1, 4]
    assert "world-lifelong-qwen2-vl" in out["model"] and "lifelong-seed0" in out["data"]
    assert not any("cannot check" in n for n in out["notes"])
    assert row["locality_acc"] is not None and row["cross_edit_count"] is not None
