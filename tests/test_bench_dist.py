"""The bench across processes and restarts: torchrun ranks, the per-rank JSONL, --resume, Ctrl-C.

Every run here is FT and LoRA on a few cases of the bundled world, on the CPU (gloo). The quality
columns (every accuracy, locality, decoupling and curve value; not seconds or memory) of a run on
two processes, of a run killed and resumed, and of one process must be equal.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest

import mke_plugins
from mke_hooks import MKEError
from mke_plugins.bench.resume import ctrl_c_after, differences, journal_paths, rank_path

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py

ROOT = Path(mke_plugins.__file__).resolve().parent.parent
CASES = 4
SINGLE = ["--methods", "FT,LoRA", "--cases", str(CASES), "--plot", ""]
SEQUENTIAL = SINGLE + ["--mode", "sequential", "--sequential-n", "2", "--checkpoints", "1,2"]
#: keys that measure the machine, not the edit
MACHINE = ("seconds", "memory", "fwdbwd", "extra", "hparams")


def quality(result: dict[str, Any]) -> dict[str, Any]:
    """The method rows without their time, memory and per-edit stats (the curve kept, minus its seconds)."""
    def strip(obj: Any) -> Any:
        if isinstance(obj, dict):
            return {k: strip(v) for k, v in obj.items() if not any(t in k for t in MACHINE)}
        if isinstance(obj, list):
            return [strip(v) for v in obj]
        return obj

    return strip(result["methods"])


def _env() -> dict[str, str]:
    path = os.pathsep.join([str(ROOT), str(ROOT / "hooks"), os.environ.get("PYTHONPATH", "")])
    return dict(os.environ, PYTHONPATH=path, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")


def bench(args: list[str], json_path: Path, procs: int = 1, **kw: Any) -> subprocess.CompletedProcess[str]:
    """``python -m mke_plugins bench`` in one process, or under torchrun with ``procs`` ranks."""
    head = [sys.executable, "-m", "mke_plugins"] if procs == 1 else \
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(procs),
         "-m", "mke_plugins"]
    return subprocess.run(head + ["bench", *args, "--json", str(json_path)], capture_output=True, text=True,
                          env=_env(), cwd=json_path.parent, timeout=600, **kw)


def read(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


@pytest.fixture(scope="module")
def one_process(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    """The reference: single and sequential mode in one process."""
    out = {}
    for mode, args in (("single", SINGLE), ("sequential", SEQUENTIAL)):
        path = tmp_path_factory.mktemp(f"one-{mode}") / "r.json"
        done = bench(args, path)
        assert done.returncode == 0, done.stderr[-3000:]
        out[mode] = read(path)
    return out


@pytest.mark.parametrize("mode", ["single", "sequential"])
def test_two_processes_give_the_one_process_quality_columns(mode, one_process, tmp_path):
    path = tmp_path / "r.json"
    done = bench(SINGLE if mode == "single" else SEQUENTIAL, path, procs=2)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read(path)
    assert result["processes"] == 2 and result["cases"] == CASES
    assert quality(result) == quality(one_process[mode])
    assert [p.name for p in journal_paths(path)] == ["r.json.rank0.jsonl", "r.json.rank1.jsonl"]
    units = [json.loads(line) for p in journal_paths(path) for line in p.read_text().splitlines()[1:]]
    if mode == "single":  # strided: rank 0 cases 0, 2; rank 1 cases 1, 3
        assert [u["index"] for u in units] == [0, 2, 1, 3]
    else:  # whole sequences (2 cases each), never split: FT's two and LoRA's two, strided
        assert [(u["method"], u["start"], len(u["cases"])) for u in units] == \
            [("FT", 0, 2), ("LoRA", 0, 2), ("FT", 2, 2), ("LoRA", 2, 2)]
        assert [p["n_sequences"] for p in result["methods"]["FT"]["curve"]] == [2, 2]
    edits = CASES * 2  # one progress bar (rank 0's), counting every rank's edits to the end
    assert len(re.findall(rf"\| 0/{edits} \[", done.stderr)) == 1 and f"| {edits}/{edits} [" in done.stderr


def test_accelerate_launch_shares_the_cases_too(one_process, tmp_path):
    """``accelerate launch --multi_gpu`` starts the ranks through torchrun's launcher (gloo on a CPU machine)."""
    path = tmp_path / "r.json"
    done = subprocess.run([sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
                           "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                           "-m", "mke_plugins", "bench", *SINGLE, "--json", str(path)],
                          capture_output=True, text=True, env=_env(), cwd=tmp_path, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read(path)
    assert result["processes"] == 2 and len(journal_paths(path)) == 2
    assert quality(result) == quality(one_process["single"])


def _units(path: Path) -> int:
    try:
        return max(0, len(rank_path(path, 0).read_text().splitlines()) - 1)
    except FileNotFoundError:
        return 0


def _run_until(path: Path, units: int, sig: int) -> subprocess.Popen[str]:
    proc = subprocess.Popen([sys.executable, "-m", "mke_plugins", "bench", *SINGLE, "--json", str(path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env(), cwd=path.parent)
    deadline = time.monotonic() + 300
    while _units(path) < units and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert proc.poll() is None, f"the run ended before {units} units: {proc.stderr.read()[-2000:]}"
    proc.send_signal(sig)
    proc.wait(timeout=120)
    return proc


def test_sigkill_half_way_then_resume_gives_the_uninterrupted_quality_columns(one_process, tmp_path):
    path = tmp_path / "r.json"
    _run_until(path, 2, signal.SIGKILL)
    kept = _units(path)
    assert 2 <= kept < CASES and not path.exists()  # killed half-way: some units kept, no result yet
    done = bench(SINGLE + ["--resume"], path)
    assert done.returncode == 0, done.stderr[-3000:]
    result = read(path)
    assert f"resumed: {kept} of {CASES} units read from the journal" in result["notes"]
    assert quality(result) == quality(one_process["single"])
    assert _units(path) == CASES  # the resumed units were appended to the same file, each once


def test_ctrl_c_writes_what_is_done_and_prints_the_resume_command(one_process, tmp_path):
    path = tmp_path / "r.json"
    proc = _run_until(path, 2, signal.SIGINT)
    err = proc.stderr.read()
    assert proc.returncode == 130, err[-2000:]
    partial = read(path)
    assert partial["interrupted"]["units"] == CASES and partial["interrupted"]["units_done"] == _units(path)
    assert f"python -m mke_plugins bench {' '.join(SINGLE[:4])}" in err and "--resume" in err
    done = bench(SINGLE + ["--resume"], path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert quality(read(path)) == quality(one_process["single"])


def test_resume_refuses_another_run_naming_the_difference(tmp_path):
    from mke_plugins.bench import BenchConfig, methods_from, run_bench

    path = tmp_path / "r.json"

    def run(methods: str = "FT", cases: int = 2, resume: bool = True, seed: int | None = None) -> Any:
        return run_bench(BenchConfig(methods=methods_from(methods), cases=cases, generate=False, progress=False,
                                     journal=str(path), resume=resume, seed=seed))

    first = run(resume=False)
    with pytest.raises(MKEError, match=r"methods: \['FT'\] -> \['FT', 'LoRA'\]"):
        run("FT,LoRA")
    with pytest.raises(MKEError, match=r"cases: 2 -> 3.*data_digest"):
        run(cases=3)
    with pytest.raises(MKEError, match=r"seed: None -> 4"):
        run(seed=4)
    lines = rank_path(path, 0).read_text().splitlines()
    header = json.loads(lines[0])
    header["fingerprint"]["hparams"]["FT"]["lr"] = 123.0
    rank_path(path, 0).write_text("\n".join([json.dumps(header)] + lines[1:]) + "\n")
    with pytest.raises(MKEError, match=r"FT hparams lr: 123.0 -> "):
        run()
    rank_path(path, 0).write_text("\n".join(lines) + "\n")
    again = run()  # the same run: nothing left to do, the same rows
    assert "resumed: 2 of 2 units read from the journal" in again["notes"]
    assert quality(again) == quality(first)
    fresh = run(resume=False)  # without --resume: starts over, and says what it removed
    assert "started over: 2 finished units an earlier run left beside" in " ".join(fresh["notes"])
    assert _units(path) == 2
    again = run()
    assert "resumed: 2 of 2 units read from the journal" in again["notes"]
    assert quality(again) == quality(first)
    with rank_path(path, 0).open("a") as f:  # a unit half-written when the run was killed: done again
        f.write('{"unit": "case", "index": 1, "cas')
    lines = rank_path(path, 0).read_text().splitlines()
    rank_path(path, 0).write_text("\n".join(lines[:2] + [lines[-1]]))  # unit 0 kept, unit 1 torn
    again = run()
    assert "resumed: 1 of 2 units read from the journal" in again["notes"] and quality(again) == quality(first)
    assert [json.loads(line)["index"] for line in rank_path(path, 0).read_text().splitlines()[1:]] == [0, 1]
    with pytest.raises(MKEError, match="--resume needs --json"):
        run_bench(BenchConfig(methods=methods_from("FT"), cases=1, resume=True))


def test_differences_name_each_changed_hparam():
    old = {"methods": ["FT"], "hparams": {"FT": {"lr": 0.1, "steps": 5}}, "seed": None}
    new = {"methods": ["FT"], "hparams": {"FT": {"lr": 0.2, "steps": 5}}, "seed": 1}
    assert differences(old, new) == ["FT hparams lr: 0.1 -> 0.2", "seed: None -> 1"]
    assert differences(new, new) == []


def test_ranks_take_strided_units_and_the_resume_command_keeps_the_launcher(monkeypatch):
    from mke_plugins.bench.cli import resume_command
    from mke_plugins.bench.dist import Ranks

    assert Ranks(rank=1, size=3).mine(list(range(8))) == [1, 4, 7]
    assert Ranks().mine([0, 1]) == [0, 1]
    for k in [k for k in os.environ if k in ("WORLD_SIZE", "LOCAL_WORLD_SIZE") or k.startswith("ACCELERATE_")]:
        monkeypatch.delenv(k)
    argv = ["/x/bin/mke-plugins", "bench", "--cases", "40", "--json", "a b.json"]
    assert resume_command(argv) == "mke-plugins bench --cases 40 --json 'a b.json' --resume"
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert resume_command(["/x/mke_plugins/__main__.py", "bench", "--resume"]) == \
        "torchrun --nproc_per_node 4 -m mke_plugins bench --resume"
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    assert resume_command(["/x/__main__.py", "bench"]).startswith(
        "accelerate launch --multi_gpu --num_processes 4 -m mke_plugins")


def test_device_map_is_refused_beside_several_processes(monkeypatch):
    from mke_plugins.bench.dist import start

    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(MKEError, match="--device-map spreads one model"):
        start("cpu", device_map="auto")


def test_ctrl_c_on_another_thread_waits_for_the_block():
    """A SIGINT the kernel hands to another thread (tqdm's monitor, a torch worker) still waits for the
    block's end: the unit is journaled and counted, then the run stops."""
    stop = threading.Event()
    other = threading.Thread(target=stop.wait)
    other.start()
    steps = []
    try:
        with pytest.raises(KeyboardInterrupt):
            with ctrl_c_after():
                signal.pthread_kill(other.ident, signal.SIGINT)
                start = time.monotonic()
                while time.monotonic() - start < 0.5:  # bytecode after the signal, where Python checks for it
                    steps.append(1)
                steps.append("done")
    finally:
        stop.set()
        other.join()
    assert steps[-1] == "done"
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
