"""The sequential protocol: collisions between a sequence's probes and its edits, checkpoints, colours.

The world's records today name the edit's fact but not their probes' facts, so the collision tests
add identities to a few world records (two edits of one entity each for Thyviklem and Vazoustu).
"""

from __future__ import annotations

import copy
import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from mke_hooks import MKEError
from mke_plugins.bench.collisions import CROSS_KIND, cross_edit_scores, plan_notes, plan_sequence
from mke_plugins.bench.curve import CURVE_METRICS, Checkpoint, curve
from mke_plugins.bench.probes import ProbeOutput

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

#: world edit records, in this sequence order: Thyviklem lives_in, Thyviklem sport, Vazoustu instrument,
#: Vazoustu eats, and two edits of other entities
ORDER = [7, 11, 4, 10, 0, 1]


def _with_identities(rec: dict[str, Any], pool: str) -> dict[str, Any]:
    """A world record (raw or request dict) whose probes name their facts, as the lifelong world's do."""
    rec = copy.deepcopy(rec)
    for item in rec.get("fine_locality") or []:
        item["entity"] = rec["entity"]
    for item in rec.get("portability") or []:
        item["entity"] = rec["entity"]
        item["derived_from"] = [{"entity": rec["entity"], "relation": "lives_in"}]
    rec["loc_fact"] = {"entity": f"{pool}-t", "relation": "eats"}
    rec["m_loc_fact"] = {"entity": f"{pool}-m", "relation": "made_of"}
    return rec


@pytest.fixture(scope="module")
def requests() -> list[dict[str, Any]]:
    from mke_plugins import world

    recs = world.record_paths("edit")
    return [_with_identities(recs[i], f"pool{k}") for k, i in enumerate(ORDER)]


def _fine(req: dict[str, Any], relation: str) -> list[int]:
    return [j for j, it in enumerate(req["fine_locality"]) if it["relation"] == relation]


def _out(acc: float) -> ProbeOutput:
    import torch

    return ProbeOutput(acc, acc == 1.0, torch.zeros(1, 1, dtype=torch.long))


# -- (a) collisions ---------------------------------------------------------------------------------
def test_fine_locality_of_another_edits_fact_is_cross_edit_not_locality(requests):
    plan = plan_sequence(requests, list(range(len(requests))))
    first, second = plan.plans[0], plan.plans[1]
    n_fine = len(requests[0]["fine_locality"])
    # edit 0 (Thyviklem lives_in) asks Thyviklem's sport, which edit 1 changes to 'chess'
    assert {t.item for t in first.touched} == set(_fine(requests[0], "sport"))
    assert sum(p.kind == "fine_locality" for p in first.probes) == n_fine - 3
    cross = [p for p in first.probes if p.kind == CROSS_KIND]
    assert len(cross) == 3 and {p.query.target for p in cross} == {requests[1]["target"]}
    t = first.touched[0]
    assert t.probe_at(1) is None and first.probes[t.probe_at(2)].query.target == requests[1]["target"]
    # its portability (country, derived from its own fact) is untouched by the others: still portability
    assert sum(p.kind == "portability" for p in first.probes) == len(requests[0]["portability"]) == 3
    # edit 1 asks Thyviklem's city, which edit 0 changed to 'Corvin'
    assert {t.item for t in second.touched} == set(_fine(requests[1], "lives_in"))
    assert {p.query.target for p in second.probes if p.kind == CROSS_KIND} == {requests[0]["target"]}
    # scoring: unscored before the touching edit is made, then against its answer
    post = [_out(1.0 if p.kind == CROSS_KIND else 0.0) for p in first.probes]
    assert cross_edit_scores(first, post, 1) == {"cross_edit_consistency": None, "cross_edit_success": None,
                                                 "cross_edit_n": 0, "cross_edit_unscored": 3}
    assert cross_edit_scores(first, post, 2)["cross_edit_consistency"] == 1.0
    assert [len(p.touched) for p in plan.plans] == [3, 3, 3, 3, 0, 0]
    assert not any("cannot check" in n for n in plan_notes([plan]))


def test_derived_probe_expects_the_touching_edits_portability_answer(requests):
    reqs = copy.deepcopy(requests[:2])
    port = next(it for it in reqs[0]["portability"] if it["form"] == "text")
    reqs[1]["fine_locality"].append({"prompt": port["prompt"], "answer": "Oldland", "form": "text",
                                     "relation": "country", "entity": reqs[1]["entity"], "image": None,
                                     "derived_from": [{"entity": reqs[1]["entity"], "relation": "lives_in"}]})
    # a second edit of Thyviklem's city: edit 0's portability is now touched by another edit
    again = copy.deepcopy(reqs[0])
    again["target"] = "Hollin"
    for it in again["portability"]:
        it["answer"] = "Newland"
    reqs.append(again)
    plan = plan_sequence(reqs, [0, 1, 2])
    second = plan.plans[1]
    derived = [t for t in second.touched if reqs[1]["fine_locality"][t.item]["relation"] == "country"]
    assert len(derived) == 1
    assert second.probes[derived[0].probe_at(1)].query.target == port["answer"]  # edit 0's text-form answer
    assert second.probes[derived[0].probe_at(3)].query.target == "Newland"  # the newest edit of the source
    first = plan.plans[0]
    ports = [t for t in first.touched if t.kind == "portability"]
    assert len(ports) == 3
    assert {first.probes[t.probe_at(1)].query.target for t in ports} == {it["answer"] for it in reqs[0]["portability"]}
    assert {first.probes[t.probe_at(3)].query.target for t in ports} == {"Newland"}
    assert any("edited more than once" in n for n in plan_notes([plan]))


def test_touched_locality_probe_is_left_out_of_locality_and_named(requests):
    reqs = copy.deepcopy(requests)
    reqs[4]["loc_fact"] = {"entity": "Thyviklem", "relation": "sport"}
    plan = plan_sequence(reqs, list(range(6)))
    assert plan.left_out == {"T-Loc": 1}
    assert not any(p.kind == "locality" for p in plan.plans[4].probes)
    assert any(p.kind == "locality" for p in plan.plans[3].probes)
    note = " ".join(plan_notes([plan]))
    assert re.search(r"1 T-Loc probe\(s\) ask about a fact their own sequence edits \(e\.g\. case 0 \(request 4\), "
                     r"T-Loc probe \(loc_fact\) asks about Thyviklem / sport, which edit 2 of 6 changes\)", note)
    reqs = copy.deepcopy(requests)
    reqs[5]["m_loc_fact"] = {"entity": "Pool", "relation": "country",
                             "derived_from": [{"entity": "Thyviklem", "relation": "lives_in"}]}
    plan = plan_sequence(reqs, list(range(6)))
    assert plan.left_out == {"M-Loc": 1} and "Thyviklem / lives_in" in " ".join(plan_notes([plan]))
    reqs[5]["m_loc_fact"] = {"entity": "Pool"}
    plan_sequence(reqs, list(range(6)))  # names no relation: unchecked, not an error
    reqs[5]["m_loc_fact"] = {"entity": "Pool", "relation": ""}
    with pytest.raises(MKEError, match="'relation' must be a non-empty string"):
        plan_sequence(reqs, list(range(6)))


def test_data_without_identities_runs_and_says_it_cannot_check():
    from mke_plugins import world

    recs = [_without_identities(r) for r in world.record_paths("edit")[:12]]
    plan = plan_sequence(recs, list(range(12)))
    assert plan.n_touched == 0  # nothing is guessed from the wording
    note = " ".join(plan_notes([plan]))
    assert "cannot check collisions between probes and edits" in note and "T-Loc" in note


def _without_identities(request: dict[str, Any]) -> dict[str, Any]:
    """A world request as older data has it: no fact named on its probes."""
    out = {k: v for k, v in request.items() if k not in ("loc_fact", "m_loc_fact")}
    for key in ("fine_locality", "portability"):
        out[key] = [{k: v for k, v in it.items() if k not in ("entity", "derived_from")} for it in request[key]]
    return out


# -- (b) checkpoints --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def identity_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mke_plugins import world

    src = world.data_dir()
    raw = json.loads((src / "edit.json").read_text())
    out = tmp_path_factory.mktemp("seqdata") / "edit.json"
    out.write_text(json.dumps([_with_identities(raw[i], f"pool{k}") for k, i in enumerate(ORDER)]))
    return out


@pytest.fixture(scope="module")
def curve_result(identity_data: Path) -> dict[str, Any]:
    from mke_plugins import world
    from mke_plugins.bench.runner import BenchConfig, methods_from, run_bench

    return run_bench(BenchConfig(methods=methods_from("FT"), data=str(identity_data), image_root=str(world.data_dir()),
                                 mode="sequential", checkpoints=[1, 3, 6, 50], keep_cases=True, progress=False,
                                 generate=False))


def test_checkpoints_give_a_curve_whose_last_point_is_the_row(curve_result):
    row = curve_result["methods"]["FT"]
    pts = row["curve"]
    assert [p["T"] for p in pts] == [1, 3, 6] and [p["n_cases"] for p in pts] == [1, 3, 6]
    assert curve_result["checkpoints"] == [1, 3, 6, 50]
    assert any("checkpoints 50 lie beyond" in n for n in curve_result["notes"])
    last = pts[-1]
    for key in CURVE_METRICS:
        assert last[key] == pytest.approx(row[key]) if row[key] is not None else last[key] is None, key
    for p in pts:  # T <= 100: retention is the reliability of every edit made so far
        assert p["retention"] == pytest.approx(p["rewrite_acc"])
        assert p["edit_seconds_last10"] > 0 and p["held_edits"] == p["T"] and p["held_bytes"] == 0  # FT: in place
    assert last["retention"] == pytest.approx(sum(c["rewrite_acc"] for c in row["cases"]) / 6)
    # cross-edit probes: 3 per edit of Thyviklem / Vazoustu, each scored once the other edit is made
    assert [(p["cross_edit_count"], p["cross_edit_unscored"]) for p in pts] == [(0, 3), (6, 3), (12, 0)]
    assert row["cross_edit_count"] == 12 and row["cross_edit_unscored"] == 0
    assert row["cross_edit_consistency"] is not None and 0 <= row["cross_edit_consistency"] <= 1
    assert [c["fine_locality_n"] for c in row["cases"]][:4] == [9, 9, 12, 12]
    assert not any("cannot check" in n for n in curve_result["notes"])


def test_easyedit_sequential_protocol_is_reported_beside_ours(curve_result):
    """Each case also scored right after its own edit (EasyEdit's ``sequential_edit=True``): the last
    case's scores equal its end-of-sequence ones (the same model), the row averages them, the table says so."""
    from mke_plugins.bench.report import table
    from mke_plugins.bench.score import AT_EDIT_KEYS

    row = curve_result["methods"]["FT"]
    cases = row["cases"]
    for key in AT_EDIT_KEYS:
        assert all(f"{key}_at_edit" in c for c in cases), key
        assert cases[-1][f"{key}_at_edit"] == cases[-1][key], key
        assert row[f"{key}_at_edit"] == pytest.approx(sum(c[f"{key}_at_edit"] for c in cases) / len(cases))
    assert row["rewrite_acc_at_edit"] >= row["rewrite_acc"]  # FT forgets its earlier edits, not the one just made
    assert "each edit scored right after it was made (EasyEdit's sequential_edit=True): Rel " in table(curve_result)


def test_curve_table_and_figure(curve_result, tmp_path):
    from mke_plugins.bench.report import curve_path, has_curve, plot_curve, table

    text = table(curve_result)
    assert "X-Edit" in text and "Retain" in text and "s/edit10" in text
    assert has_curve(curve_result)
    path = plot_curve(curve_result, curve_path(tmp_path / "r.png"))
    assert path.name == "r-curve.png" and path.read_bytes()[:4] == b"\x89PNG"


def test_retention_reads_the_first_100_edits():
    cases = [{"rewrite_acc": 1.0 if k < 100 else 0.0} for k in range(150)]
    (pt,) = curve([Checkpoint(150, cases, [1.0] * 150, [None] * 150)])
    assert pt["retention"] == 1.0 and pt["rewrite_acc"] == pytest.approx(100 / 150)
    assert pt["held_bytes"] is None and pt["held_edits"] == 0
    a = Checkpoint(2, [{"rewrite_acc": 1.0}, {"rewrite_acc": 0.0}], [1.0, 3.0], [10.0, None])
    b = Checkpoint(2, [{"rewrite_acc": 1.0}, {"rewrite_acc": 1.0}], [5.0, 7.0], [30.0, 30.0])
    (pt,) = curve([a, b])  # two sequences reaching T=2: pooled cases, mean held memory
    assert pt["rewrite_acc"] == 0.75 and pt["edit_seconds_last10"] == 4.0
    assert pt["edit_seconds_early"] == 5.0  # edits 2-11 only: the second edit of each sequence (3.0, 7.0)
    (late,) = curve([Checkpoint(30, [{}] * 30, [100.0] + [float(k) for k in range(1, 30)], [None] * 30)])
    assert late["edit_seconds_early"] == 5.5 and late["edit_seconds_last10"] == 24.5  # edit 1 (100 s) left out
    assert pt["held_bytes"] == 35.0 and pt["held_edits"] == 1.5 and pt["n_sequences"] == 2


def test_checkpoints_need_sequential_mode():
    from mke_plugins.bench.runner import Bench, BenchConfig, methods_from
    from mke_plugins.cli import main

    with pytest.raises(MKEError, match="--checkpoints needs --mode sequential"):
        Bench(BenchConfig(methods=methods_from("FT"), cases=1, checkpoints=[1]))
    with pytest.raises(MKEError, match="at least 1"):
        Bench(BenchConfig(methods=methods_from("FT"), cases=1, mode="sequential", checkpoints=[0]))
    assert main(["bench", "--checkpoints", "1,2", "--no-progress"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--mode", "sequential", "--checkpoints", "1,x"])


# -- (c) colours ------------------------------------------------------------------------------------
def _drawn_colours(monkeypatch, result: dict[str, Any], tmp_path: Path) -> dict[str, set[str]]:
    """label -> colours of the bars and lines drawn for it in both figures."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.colors as mcolors
    import matplotlib.pyplot as plt

    from mke_plugins.bench import report

    figs = []
    close = plt.close
    monkeypatch.setattr(plt, "close", figs.append)
    report.plot(result, tmp_path / "a.png")
    report.plot_curve(result, tmp_path / "b.png")
    seen: dict[str, set[str]] = {}
    for fig in figs:
        for ax in fig.axes:
            for art in [*ax.containers, *ax.lines]:
                label = art.get_label()
                if label not in result["methods"]:
                    continue
                for colour in ([art.get_color()] if hasattr(art, "get_color") else
                               [bar.get_facecolor() for bar in art.patches]):  # bars: every bar drawn
                    seen.setdefault(label, set()).add(mcolors.to_hex(colour))
        close(fig)
    return seen


def test_each_method_keeps_one_colour_in_every_figure_and_run(monkeypatch, tmp_path):
    from mke_plugins.bench.report import METHOD_COLOURS, method_colour

    names = ["FT", "ASAM", "DECODE[group_mode=disjoint]", "easyedit:WISE", "myplugin"]
    point = {"T": 1, "rewrite_acc": 0.5}
    row = {"rewrite_acc": 0.5, "edit_seconds_median": 0.1, "edit_seconds_p90": 0.2}

    def result(order):
        return {"cases": 2, "mode": "sequential", "sequential_n": 2, "model": "/m/world",
                "methods": {n: dict(row, curve=[point, dict(point, T=2)]) for n in order}}

    one = _drawn_colours(monkeypatch, result(names), tmp_path)
    two = _drawn_colours(monkeypatch, result(list(reversed(names))[:3]), tmp_path)
    assert all(len(c) == 1 for c in one.values()) and set(one) == set(names)
    for name, colours in two.items():
        assert colours == one[name] == {method_colour(name)}
    assert one["FT"] == {METHOD_COLOURS["FT"]} and one["ASAM"] == {METHOD_COLOURS["ASAM"]}
    hashed = {method_colour(n) for n in ("DECODE[group_mode=disjoint]", "myplugin")}
    assert not hashed & set(METHOD_COLOURS.values())
    # the same in another process, whatever its string hash seed
    code = "from mke_plugins.bench.report import method_colour as c; print(c('myplugin'), c('X[a=1]'))"
    env = dict(os.environ, PYTHONHASHSEED="123")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    assert out.stdout.split() == [method_colour("myplugin"), method_colour("X[a=1]")]


def test_batches_beyond_the_memory_budget_are_built_again_with_the_same_results():
    from mke_plugins.bench.runner import BenchConfig, methods_from, run_bench

    def run(mb: float) -> dict[str, Any]:
        r = run_bench(BenchConfig(methods=methods_from("FT"), cases=3, mode="sequential", checkpoints=[1, 2],
                                  progress=False, generate=False, keep_batches_mb=mb))["methods"]["FT"]
        timing = ("seconds", "ratio", "memory", "extra")
        return {"row": {k: v for k, v in r.items() if k != "curve" and not any(t in k for t in timing)},
                "curve": [{k: v for k, v in p.items() if "seconds" not in k} for p in r["curve"]]}

    assert run(0) == run(2048)
