"""`mke-plugins bench` runs EasyEdit main's own WISE, GRACE and LoRA on the world, out of the box.

No ``--easyedit-hparams``: the bench's bundled world YAMLs are used. Single mode undoes every edit
and checks the model bit for bit; sequential mode undoes the whole sequence in reverse order and
checks it (``Bench`` raises ``RestoreError`` otherwise). A refused row (IKE) is one line under the
table and the run goes on. Skipped unless the host check is set up (``EASYEDIT_SRC``, see conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.host

CASES = 3
ROWS = ["FT", "easyedit:WISE", "easyedit:GRACE", "easyedit:LoRA"]


def _run(mode: str) -> dict[str, Any]:
    from mke_plugins.bench.runner import Bench, BenchConfig, methods_from

    bench = Bench(BenchConfig(methods=methods_from(",".join(ROWS + ["easyedit:IKE"])), cases=CASES, mode=mode,
                              progress=False))
    model = bench.model
    result = bench.run()
    assert bench.model is model, "the undo must leave the bench on the model it loaded"
    assert all(p.requires_grad for p in model.parameters()), "EasyEdit froze the model and the undo left it so"
    return result


@pytest.fixture(scope="module")
def single(easyedit: Any) -> dict[str, Any]:
    return _run("single")


@pytest.fixture(scope="module")
def sequential(easyedit: Any) -> dict[str, Any]:
    return _run("sequential")


def _check_rows(result: dict[str, Any]) -> None:
    assert list(result["methods"]) == ROWS
    for label in ROWS[1:]:
        row = result["methods"][label]
        assert row["source"] == "EasyEdit" and row["restore_verified"] is True
        assert row["hparams"]["model_name"].endswith("world-qwen2-vl"), row["hparams"]["model_name"]
    refused = [n for n in result["notes"] if n.startswith("easyedit:IKE")]
    assert refused == ["easyedit:IKE cannot be benched: its apply returns in-context examples, not an edited model"]


def test_single_rows_appear_edits_take_and_restore_bit_identically(single: dict[str, Any]) -> None:
    _check_rows(single)
    m = single["methods"]
    assert {k: m[k]["restore"] for k in ROWS[1:]} == {"easyedit:WISE": "callable", "easyedit:GRACE": "callable",
                                                      "easyedit:LoRA": "peft"}
    for label in ROWS[1:]:  # each reaches every target token of these cases, measured one row per pass
        assert m[label]["rewrite_acc"] == 1.0, (label, m[label]["rewrite_acc"])
    assert m["easyedit:GRACE"]["locality_acc"] == 1.0  # a GRACE key fires on its own prompt only


def test_sequential_rows_appear_and_the_sequence_is_undone(sequential: dict[str, Any]) -> None:
    _check_rows(sequential)
    assert sequential["sequential_n"] == CASES
    for label in ("easyedit:WISE", "easyedit:GRACE"):  # side memories keep every edit of the sequence
        assert sequential["methods"][label]["rewrite_acc"] == 1.0, label


def test_cli_runs_the_bundled_rows(easyedit: Any, scratch: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mke_plugins.cli import main

    out = scratch / "r.json"
    code = main(["bench", "--methods", "easyedit:GRACE,easyedit:IKE", "--cases", "1", "--mode", "sequential",
                 "--json", str(out), "--plot", "", "--no-progress"])
    printed = capsys.readouterr().out
    assert code == 0 and "easyedit:GRACE" in printed and "note: easyedit:IKE cannot be benched" in printed
    assert "Executing" not in printed and "loss" not in printed  # EasyEdit's prints go to the log
    assert list(json.loads(out.read_text())["methods"]) == ["easyedit:GRACE"]
