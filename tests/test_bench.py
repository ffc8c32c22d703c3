"""`mke-plugins bench` on a few world cases: schema, scoring plumbing, restore checks, modes, CLI."""

from __future__ import annotations

import importlib.machinery
import json
import sys
import types
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from mke_hooks import MKEError
from mke_plugins.bench.methods import BoundMethod, MethodRequest, parse_method, parse_methods, split_methods
from mke_plugins.bench.probes import ProbeOutput
from mke_plugins.bench.restore import RestoreError
from mke_plugins.bench.runner import Bench, BenchConfig, methods_from
from mke_plugins.bench.score import SCHEMA_KEYS
from mke_plugins.core.snapshot import RestoreHandle

ACC_KEYS = [k for k in SCHEMA_KEYS if k.endswith(("_acc", "_easyedit")) or k in ("dfr_text", "dfr_image",
                                                                                   "joint_consistency")]


def _noop(label: str = "noop") -> BoundMethod:
    """A method that changes nothing: post must equal pre everywhere."""
    def apply(model, tok, requests, hparams, copy=False, return_orig_weights=False, keep_original_weight=False,
              **kwargs):
        assert isinstance(requests, list)
        return model, RestoreHandle()

    return BoundMethod(MethodRequest(label, label), apply, SimpleNamespace(alg_name=label), "snapshot", "test")


@pytest.fixture(scope="module")
def single_result() -> dict:
    bench = Bench(BenchConfig(methods=methods_from("FT,FT[layer=0,lr=0.02]"), cases=2, keep_cases=True,
                              progress=False))
    bench.methods.append(_noop())
    return bench.run()


# -- parsing -----------------------------------------------------------------------------------
def test_method_strings_split_outside_brackets_and_parse_yaml_values():
    assert split_methods("DECODE,DECODE[group_mode=disjoint],ASAM[lar=false,rcsl=false]") == [
        "DECODE", "DECODE[group_mode=disjoint]", "ASAM[lar=false,rcsl=false]"]
    r = parse_method("ASAM[lar=false, lar_eps=1e-2, rcsl_rank=2, name=x]")
    assert r.label == "ASAM[lar=false, lar_eps=1e-2, rcsl_rank=2, name=x]" and r.name == "ASAM"
    assert r.overrides == {"lar": False, "lar_eps": 0.01, "rcsl_rank": 2, "name": "x"}
    assert parse_method("LoRA[layers=[0, 1],lr=1e-3]").overrides == {"layers": [0, 1], "lr": 0.001}
    e = parse_method("easyedit:GRACE")
    assert e.easyedit and e.name == "GRACE" and e.overrides == {}
    for bad, msg in (("A[x=1", "never closed"), ("A],B", "without"), ("A[x]", "key=value"), ("A,A", "more than once"),
                     ("[x=1]", "cannot read")):
        with pytest.raises(MKEError, match=msg):
            parse_methods(bad)


# -- the single-edit protocol ----------------------------------------------------------------------
def test_result_has_the_schema_and_valid_numbers(single_result):
    r = single_result
    assert r["mode"] == "single" and r["cases"] == 2 and r["model"].endswith("world-qwen2-vl")
    assert list(r["methods"]) == ["FT", "FT[layer=0,lr=0.02]", "noop"]
    for name, row in r["methods"].items():
        for key in SCHEMA_KEYS:
            assert key in row, f"{name} lacks {key}"
        for key in ACC_KEYS:
            assert row[key] is None or 0.0 <= row[key] <= 1.0, (name, key, row[key])
        assert row["edit_seconds_median"] >= 0 and row["peak_memory_mb"] > 0
        assert row["restore_verified"] is True and len(row["cases"]) == 2
    json.dumps(r, allow_nan=False)  # no NaN anywhere


def test_ablation_row_gets_its_overrides(single_result):
    rows = single_result["methods"]
    assert rows["FT"]["hparams"]["layer"] != 0
    assert rows["FT[layer=0,lr=0.02]"]["hparams"]["layer"] == 0
    assert rows["FT[layer=0,lr=0.02]"]["hparams"]["lr"] == 0.02
    assert rows["FT[layer=0,lr=0.02]"]["extra"]["layer"] == 0  # stats the method attached


def test_ft_edits_and_locality_compares_with_the_unedited_model(single_result):
    ft, noop = single_result["methods"]["FT"], single_result["methods"]["noop"]
    # the edit target is a new answer: the unedited model gets it wrong, FT gets it right
    assert ft["pre_rewrite_acc"] == 0.0 and ft["rewrite_acc"] == 1.0 and ft["rewrite_success"] == 1.0
    assert ft["extra"]["steps"] > 0
    # a method that changes nothing keeps every locality probe at 1 and every accuracy at its pre value
    for key in ("locality_acc", "multimodal_locality_acc", "multimodal_locality_top10", "fine_locality_acc",
                "locality_easyedit", "multimodal_locality_easyedit"):
        assert noop[key] == 1.0, key
    for kind in ("rewrite", "rephrase", "image_rephrase", "text_only", "image_only"):
        assert noop[f"{kind}_acc"] == noop[f"pre_{kind}_acc"]
    assert noop["dfr_text"] is None  # no paired success without an edit: DFR is undefined, not 0
    assert noop["joint_consistency"] == 0.0 and noop["decoupling_n"] == 2


def test_generality_is_also_reported_over_the_probes_the_unedited_model_understands(single_result):
    """Each case says, per generality probe, whether the unedited model answers it with the original answer;
    the row averages generality over those cases only. The flags are the bare model's, the same for every
    method (FT's edit does not change them)."""
    from mke_plugins.bench.probes import GENERALITY_KINDS, original_probes, understood
    from mke_plugins.bench.score import understood_columns

    ft, noop = single_result["methods"]["FT"], single_result["methods"]["noop"]
    for kind in GENERALITY_KINDS:
        assert ft[f"{kind}_understood_share"] == noop[f"{kind}_understood_share"] is not None
        flags = [c[f"{kind}_understood"] for c in ft["cases"]]
        assert flags == [c[f"{kind}_understood"] for c in noop["cases"]]
        kept = [c[f"{kind}_acc"] for c, f in zip(ft["cases"], flags, strict=True) if f]
        assert ft[f"{kind}_acc_understood"] == (sum(kept) / len(kept) if kept else None)
    bench = Bench(BenchConfig(methods=[], cases=1, progress=False))
    request = bench.requests[0]
    probes = original_probes(request)
    assert [p.kind for p in probes] == list(GENERALITY_KINDS) and {p.query.target for p in probes} == {request["pred"]}
    first = ft["cases"][0]
    assert understood(bench.adapter, bench.model, bench.tok, request) == {
        kind: first[f"{kind}_understood"] for kind in GENERALITY_KINDS}
    assert original_probes({k: v for k, v in request.items() if k != "pred"}) == []  # no original answer: none
    cases = [{"rephrase_acc": 1.0, "rephrase_understood": True}, {"rephrase_acc": 0.0, "rephrase_understood": False},
             {"rephrase_acc": 0.5, "rephrase_understood": True}, {"rephrase_acc": 0.0}]
    cols = understood_columns(cases)
    assert cols["rephrase_acc_understood"] == 0.75 and cols["rephrase_understood_share"] == 2 / 3
    assert cols["text_only_acc_understood"] is None and cols["text_only_understood_share"] is None


def test_easyedit_locality_protocol_is_reported_beside_ours(single_result):
    from mke_plugins.bench.report import table

    for name, row in single_result["methods"].items():
        assert row["multimodal_locality_top10"] == row["multimodal_locality_easyedit"], name
        for case in row["cases"]:
            for key in ("locality_easyedit", "multimodal_locality_easyedit"):
                assert 0.0 <= case[key] <= 1.0, (name, key, case[key])
    header = table(single_result).splitlines()[0]
    assert "T-Loc(EE)" in header and "M-Loc(EE)" in header


def _probe_output(answer: list[int], sequence: list[list[int]]) -> ProbeOutput:
    return ProbeOutput(1.0, True, torch.tensor(answer).view(-1, 1), torch.tensor(sequence))


def test_easyedit_locality_reads_every_position_ours_only_the_answer():
    from mke_plugins.adapters.base import Query
    from mke_plugins.bench.probes import Probe
    from mke_plugins.bench.score import score_case

    probes = [Probe("rewrite", Query(None, "p", "t")), Probe("locality", Query(None, "q", "a")),
              Probe("multimodal_locality", Query("img", "q", "a"))]
    rewrite = _probe_output([1], [[1]])
    # T-Loc: 4 positions, the last two are the answer's; the edit changes one prompt position only
    pre_t, post_t = _probe_output([5, 6], [[1], [2], [5], [6]]), _probe_output([5, 6], [[1], [9], [5], [6]])
    # M-Loc: 2 positions, top-3 ids; the answer's top-1 holds, ranks 2 and 3 of the first position swap
    pre_m = _probe_output([4], [[7, 8, 9], [4, 3, 2]])
    post_m = _probe_output([4], [[7, 9, 8], [4, 3, 2]])
    out = score_case(probes, [rewrite, pre_t, pre_m], [rewrite, post_t, post_m])
    assert out["locality_acc"] == 1.0 and out["locality_easyedit"] == 0.75
    assert out["multimodal_locality_acc"] == 1.0
    assert out["multimodal_locality_easyedit"] == out["multimodal_locality_top10"] == pytest.approx(4 / 6)


def test_restore_that_is_not_exact_fails_loudly_naming_the_method():
    bench = Bench(BenchConfig(methods=methods_from("FT"), cases=1, progress=False, generate=False))
    leaky = bench.methods[0]

    def apply(model, tok, requests, hparams, **kwargs):
        edited, handle = leaky.apply(model, tok, requests, hparams, **kwargs)
        return edited, RestoreHandle()  # forgets the snapshot

    bench.methods = [BoundMethod(MethodRequest("Leaky", "FT"), apply, leaky.hparams, "snapshot", "test")]
    with pytest.raises(RestoreError, match=r"method 'Leaky': restore after case 0 .* values differ"):
        bench.run()


def test_sequential_mode_accumulates_and_restores():
    bench = Bench(BenchConfig(methods=methods_from("FT"), cases=3, mode="sequential", sequential_n=2,
                              keep_cases=True, progress=False, generate=False))
    assert bench.chunks() == [[0, 1], [2]]
    r = bench.run()
    assert r["mode"] == "sequential" and r["sequential_n"] == 2
    cases = r["methods"]["FT"]["cases"]
    assert [c["sequence_length"] for c in cases] == [2, 2, 1]
    assert all(c["generated"] is None and c["rewrite_exact_match"] is None for c in cases)
    # the world's records name every probe's fact: the collisions are checked
    assert not any("cannot check collisions between probes and edits" in n for n in r["notes"])
    assert r["methods"]["FT"]["cross_edit_count"] is not None
    # the curve's T is the sequence length; the shorter last sequence counts in the row only
    assert [(p["T"], p["n_cases"]) for p in r["methods"]["FT"]["curve"]] == [(2, 2)]


# -- EasyEdit's own methods ------------------------------------------------------------------------
def test_fwd_bwd_unit_is_the_median_of_warmed_passes_and_leaves_grads_alone(monkeypatch):
    from mke_plugins.bench import cost

    durations = [9.0, 0.03, 0.01, 0.05, 0.02, 0.04]  # the warm-up is slow and must not count
    clock = [0.0]
    calls = []

    class Adapter:
        def loss(self, model, batch):
            clock[0] += durations[len(calls)]  # each pass "takes" its scripted time
            calls.append(torch.is_grad_enabled())
            return model(batch).sum()

    monkeypatch.setattr(cost.time, "perf_counter", lambda: clock[0])
    model = torch.nn.Linear(2, 1)
    model.weight.requires_grad_(False)
    kept = torch.full_like(model.weight, 7.0)
    model.weight.grad = kept
    seconds = cost.fwd_bwd_seconds(Adapter(), model, torch.ones(3, 2), warmup=1, repeats=5)
    assert calls == [True] * 6
    assert seconds == pytest.approx(0.03)
    assert model.weight.requires_grad is False and model.bias.requires_grad is True
    assert model.weight.grad is kept and torch.equal(kept, torch.full_like(kept, 7.0))
    assert model.bias.grad is None
    with pytest.raises(ValueError):
        cost.fwd_bwd_seconds(Adapter(), model, torch.ones(3, 2), repeats=0)


@dataclass
class ToyHyperParams:
    alg_name: str = "TOY"
    model_name: str = ""
    device: str = "cpu"
    scale: float = 1.01

    @classmethod
    def from_hparams(cls, path):
        import yaml

        return cls(**yaml.safe_load(Path(path).read_text()))


def _toy_apply(model, tok, requests, hparams, copy=False, return_orig_weights=False, keep_original_weight=False,
               **kwargs):
    """EasyEdit-style: scales one weight, returns ``{name: original}`` for the default restore branch."""
    assert isinstance(requests, list), "the bench must pass a list"
    name = "lm_head.weight"
    p = model.get_parameter(name)
    orig = {name: p.detach().clone()}
    with torch.no_grad():
        p.mul_(hparams.scale)
    return model, orig


@pytest.fixture
def fake_easyedit(monkeypatch):
    mods = {}
    for name in ("easyeditor", "easyeditor.util", "easyeditor.util.alg_dict", "easyeditor.editors",
                 "easyeditor.editors.utils", "easyeditor.models", "easyeditor.models.toy",
                 "easyeditor.models.toy.toy_main"):
        m = types.ModuleType(name)
        m.__spec__ = importlib.machinery.ModuleSpec(name, None)
        mods[name] = m
        monkeypatch.setitem(sys.modules, name, m)
    _toy_apply.__module__ = "easyeditor.models.toy.toy_main"
    mods["easyeditor.models.toy"].ToyHyperParams = ToyHyperParams
    mods["easyeditor.util.alg_dict"].ALG_MULTIMODAL_DICT = {"TOY": _toy_apply, "IKE": _toy_apply}
    u = mods["easyeditor.editors.utils"]
    u.CALLABLE_RESTORE_ALGS, u.PEFT_RESTORE_ALGS, u.KEEP_EDITED_MODEL_ALGS = set(), set(), set()
    return mods


def test_easyedit_method_runs_with_a_list_and_default_restore(fake_easyedit, tmp_path):
    y = tmp_path / "toy.yaml"
    y.write_text("alg_name: TOY\nmodel_name: x\nscale: 1.5\n")
    bench = Bench(BenchConfig(methods=methods_from("easyedit:TOY,easyedit:TOY[scale=1.0]"), cases=1,
                              progress=False, generate=False, easyedit_hparams={"TOY": str(y)}))
    r = bench.run()
    scaled, same = r["methods"]["easyedit:TOY"], r["methods"]["easyedit:TOY[scale=1.0]"]
    assert scaled["source"] == "EasyEdit" and scaled["hparams"]["scale"] == 1.5
    assert same["locality_acc"] == 1.0 and same["fine_locality_acc"] == 1.0
    with pytest.raises(MKEError, match="in-context examples"):
        Bench(BenchConfig(methods=methods_from("easyedit:IKE"), cases=1, easyedit_hparams={"IKE": str(y)}))
    with pytest.raises(MKEError, match="--easyedit-hparams NOPE=PATH|has no 'NOPE'"):
        Bench(BenchConfig(methods=methods_from("easyedit:NOPE"), cases=1))


# -- data, images, CLI -----------------------------------------------------------------------------
def test_loader_matches_the_world_records():
    from mke_plugins import world
    from mke_plugins.bench.data import load_requests

    _, mine = load_requests(world.data_dir(), cases=5)
    theirs = world.record_paths("edit")[:5]
    keys = ("prompt", "target", "pred", "image", "rephrase_prompt", "image_rephrase", "locality_prompt",
            "locality_ground_truth", "multimodal_locality_image", "multimodal_locality_prompt",
            "multimodal_locality_ground_truth", "text_only_prompt", "image_only_prompt", "portability",
            "fine_locality", "case_id")
    def norm(r):  # an empty probe list and a missing one mean the same: no probe
        return {k: (None if r.get(k) == [] else r.get(k)) for k in keys}

    for a, b in zip(mine, theirs, strict=False):
        assert norm(a) == norm(b)


def test_family_images():
    from PIL import Image

    from mke_plugins.adapters.images import image_for_family, qwen_smart_resize

    im = Image.new("RGBA", (100, 50), (255, 0, 0, 0))
    q = image_for_family("qwen2-vl", im)
    assert isinstance(q, list) and q[0].mode == "RGB" and q[0].size[0] % 28 == 0 and q[0].size[1] % 28 == 0
    assert q[0].getpixel((0, 0)) == (255, 255, 255)  # transparent goes onto white, as qwen_vl_utils does
    assert qwen_smart_resize(56, 56) == (56, 56) and qwen_smart_resize(10, 10) == (56, 56)
    b = image_for_family("blip2", Image.new("RGB", (30, 20), (255, 255, 255)))
    assert b.shape == (3, 364, 364) and b.dtype == torch.float32
    assert torch.allclose(b[:, 0, 0], (1 - torch.tensor([0.48145466, 0.4578275, 0.40821073]))
                          / torch.tensor([0.26862954, 0.26130258, 0.27577711]))
    assert image_for_family("llava-onevision", im) is im
    with pytest.raises(ValueError, match="no image recipe"):
        image_for_family("gpt2", im)


def test_cli_writes_table_json_and_png(tmp_path, capsys):
    from mke_plugins.cli import main

    j, p = tmp_path / "r.json", tmp_path / "r.png"
    rc = main(["bench", "--methods", "LoRA", "--cases", "1", "--json", str(j), "--plot", str(p), "--no-progress",
               "--no-generate"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "LoRA" in out and "DFR_T" in out
    assert json.loads(j.read_text())["methods"]["LoRA"]["rewrite_acc"] is not None
    assert p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["bench", "--sequential-n", "2", "--no-progress"]) == 2  # needs --mode sequential


def test_bench_subcommand_imports_no_torch():
    """`mke-plugins methods` builds every subparser; the bench's must not import torch."""
    import subprocess

    code = ("import sys; import mke_plugins.bench.cli as c, argparse; "
            "c.add_parser(argparse.ArgumentParser().add_subparsers()); print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_easyedit_locality_probes_run_one_row_each_as_easyedit_runs_them():
    """T-Loc and M-Loc probes get unpadded single-row forwards (a padded batch's rounding can swap
    two of the top-10 ids EasyEdit's protocol compares); every probe is scored once, in its place."""
    from mke_plugins import world
    from mke_plugins.adapters import get_adapter
    from mke_plugins.bench.probes import EASYEDIT_TOPK, build_batches, case_probes, run_probes

    model, proc = world.load()
    adapter = get_adapter(model, SimpleNamespace(model_name="world", device="cpu"))
    probes = [p for r in world.records("edit")[:2] for p in case_probes(r)]
    pb = build_batches(adapter, model, proc, probes, max_rows=64)
    assert sorted(i for rows in pb.rows for i in rows) == list(range(len(probes)))
    for rows in pb.rows:
        if any(probes[i].kind in EASYEDIT_TOPK for i in rows):
            assert len(rows) == 1
    outs = run_probes(adapter, model, pb)
    for i, probe in enumerate(probes):
        alone = run_probes(adapter, model, build_batches(adapter, model, proc, [probe]))[0]
        assert torch.equal(outs[i].top1, alone.top1), (i, probe.kind)
        if probe.kind in EASYEDIT_TOPK:
            assert torch.equal(outs[i].seq_topk, alone.seq_topk), (i, probe.kind)
        else:
            assert outs[i].seq_topk is None
