"""The adapters build exactly the inputs EasyEdit main's evaluator builds, for every family.

Reference data, in order of preference:
* live: when ``EASYEDIT_SRC`` is set and the host venv (``.venv-host``, or ``MKE_HOST_PYTHON``)
  exists, ``tests/fixtures/make_fixtures.py`` runs there in a subprocess and records EasyEdit's own
  output now;
* otherwise the recorded files ``tests/fixtures/easyedit_inputs_<family>.json`` (written by the
  same script).

HF: token ids, attention mask, ``mm_token_type_ids``, labels equal; image tensors equal by shape and
checksums. LAVIS: the sample dict equals ``prepare_multimodal_edit``'s, ``batch.labels`` equals the
``outputs.labels`` EasyEdit's own Blip2OPT/MiniGPT4 code returns (one row and list mode), and the
tiny stand-in's own forward gives the same logits as EasyEdit's code on its weights.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mke_plugins.adapters import Query, get_adapter
from mke_plugins.testing.images import make_image, make_lavis_image

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
HF = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision"]
LAVIS = ["blip2", "minigpt4"]


def _host_python() -> Path | None:
    if not os.environ.get("EASYEDIT_SRC"):
        return None
    exe = Path(os.environ.get("MKE_HOST_PYTHON", ROOT / ".venv-host" / "bin" / "python"))
    return exe if exe.exists() else None


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Any:
    """``reference(family)`` -> (EasyEdit's record, where it came from)."""
    live: dict[str, Any] = {}
    exe = _host_python()
    if exe is not None:
        out = tmp_path_factory.mktemp("easyedit-live")
        env = dict(os.environ, PYTHONPATH=os.environ["EASYEDIT_SRC"])
        proc = subprocess.run([str(exe), str(FIXTURES / "make_fixtures.py"), "--out", str(out), *HF, *LAVIS],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, f"live EasyEdit recording failed:\n{proc.stderr[-3000:]}"
        for fam in HF + LAVIS:
            live[fam] = json.loads((out / f"easyedit_inputs_{fam}.json").read_text())

    def get(family: str) -> tuple[dict[str, Any], str]:
        if family in live:
            return live[family], "live EasyEdit"
        path = FIXTURES / f"easyedit_inputs_{family}.json"
        if not path.exists():
            pytest.fail(f"{path} is missing: record it with tests/fixtures/make_fixtures.py in the host venv")
        return json.loads(path.read_text()), f"recorded {path.name}"

    return get


def _close(got: torch.Tensor, want: dict[str, Any]) -> bool:
    v = got.detach().double()
    return (list(got.shape) == want["shape"]
            and math.isclose(float(v.sum()), want["sum"], rel_tol=1e-5, abs_tol=1e-3)
            and math.isclose(float((v * v).sum()), want["sum_sq"], rel_tol=1e-5, abs_tol=1e-3))


@pytest.mark.parametrize("family", HF)
def test_hf_inputs_equal_easyedit(family, reference, tiny_model, tiny_dir):
    record, source = reference(family)
    model, proc = tiny_model(family)
    adapter = get_adapter(model, SimpleNamespace(model_name=str(tiny_dir(family))))
    for rec in record["requests"]:
        seed = rec["image_seed"]
        image = None if seed is None else (make_image(seed) if family == "llava-onevision" else [make_image(seed)])
        batch = adapter.batch(model, proc, [Query(image, rec["prompt"], rec["target"])])
        what = f"{family} ({source}) {rec['prompt']!r}"
        assert proc.tokenizer.convert_ids_to_tokens(batch.inputs["input_ids"][0].tolist()) == rec["tokens"], what
        assert batch.labels.tolist() == rec["labels"], what
        assert set(batch.inputs) == set(rec["inputs"]), what
        for key, want in rec["inputs"].items():
            got = batch.inputs[key]
            if "values" in want:
                assert got.tolist() == want["values"], f"{what}: {key}"
            else:
                assert _close(got, want), f"{what}: {key}"


@pytest.mark.parametrize("family", LAVIS)
def test_lavis_inputs_equal_easyedit(family, reference, tiny_lavis):
    record, source = reference(family)
    model, tok = tiny_lavis(family)
    adapter = get_adapter(model, SimpleNamespace(model_name=family))
    queries = []
    for rec in record["requests"]:
        seed = rec["image_seed"]
        q = Query(None if seed is None else make_lavis_image(seed), rec["prompt"], rec["target"])
        queries.append(q)
        batch = adapter.batch(model, tok, [q])
        what = f"{family} ({source}) {rec['prompt']!r}"
        sample = batch.inputs["samples"]
        assert sample["text_input"] == rec["sample"]["text_input"], what
        assert sample["labels"].tolist() == rec["sample"]["labels"], what
        assert sample["prompts_len"] == rec["sample"]["prompts_len"], what
        if seed is None:
            assert sample["image"] is None and rec["sample"]["image"] is None
        else:
            assert _close(sample["image"], rec["sample"]["image"]), what
        assert batch.labels.tolist() == rec["labels"], what
        assert batch.attention_mask.tolist() == rec["attention_mask"], what
        with torch.no_grad():
            assert _close(adapter.forward(model, batch), rec["logits"]), f"{what}: stand-in logits differ"
    batch = adapter.batch(model, tok, queries)
    assert batch.labels.tolist() == record["batched"]["labels"]
    assert batch.attention_mask.tolist() == record["batched"]["attention_mask"]
    with torch.no_grad():
        assert _close(adapter.forward(model, batch), record["batched"]["logits"])


def test_fixtures_name_their_source():
    for fam in HF + LAVIS:
        path = FIXTURES / f"easyedit_inputs_{fam}.json"
        assert path.exists(), path
        data = json.loads(path.read_text())
        assert data["family"] == fam and "EasyEdit" in data["what"] and data["easyedit_commit"]
