"""The adapters build the inputs EasyEdit main recorded, without EasyEdit (runs in CI).

``tests/fixtures/easyedit_inputs_<family>.json`` hold what EasyEdit's own
``prepare_multimodal_hf_edit`` built for fixed requests on the tiny models (recorded in the
host venv by ``record_fixtures.py``). Here the adapters rebuild the same requests on the same
tiny models and must agree: token for token, label for label, mask for mask, and image tensors
by shape and checksum. When the tokenizer here was trained to a different vocabulary (another
``tokenizers`` version) ids are compared through their token strings instead.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

from easyedit_host import FAMILIES, fixture_path, native_image_for_ci, vocab_sha256


def _load(family: str) -> dict[str, Any]:
    path = fixture_path(family)
    if not path.exists():
        pytest.skip(f"{path} is missing: record it in the host venv with tests/host/record_fixtures.py")
    return json.loads(path.read_text())


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_matches_recorded_easyedit_inputs(family: str, tiny_dir: Any) -> None:
    import torch

    from mke_plugins.adapters import Query, get_adapter
    from mke_plugins.testing.tiny import load_tiny

    fixture = _load(family)
    model_dir = tiny_dir(family)
    model, proc = load_tiny(model_dir)
    hparams = type("H", (), {"model_name": str(model_dir), "device": "cpu", "dtype": torch.float32})()
    adapter = get_adapter(model, hparams)
    assert adapter.family == family
    same_vocab = vocab_sha256(proc.tokenizer) == fixture["tokenizer_vocab_sha256"]
    problems: list[str] = []
    for rec in fixture["requests"]:
        what = f"{family} request {rec['prompt']!r} -> {rec['target']!r}"
        image = None if rec["image_seed"] is None else native_image_for_ci(family, rec["image_seed"])
        batch = adapter.batch(model, proc, [Query(image, rec["prompt"], rec["target"])])
        ids = batch.inputs["input_ids"][0].tolist()
        tokens = proc.tokenizer.convert_ids_to_tokens(ids)
        if tokens != rec["tokens"]:
            problems.append(f"{what}: tokens differ\n  easyedit {rec['tokens']}\n  adapter  {tokens}")
            continue
        if same_vocab and ids != rec["inputs"]["input_ids"]["values"][0]:
            problems.append(f"{what}: input_ids differ")
        want_labels = rec["labels"][0]
        got_labels = batch.labels[0].tolist()
        if same_vocab:
            if got_labels != want_labels:
                problems.append(f"{what}: labels differ\n  easyedit {want_labels}\n  adapter  {got_labels}")
        else:
            mask_want = [v != -100 for v in want_labels]
            mask_got = [v != -100 for v in got_labels]
            if mask_want != mask_got:
                problems.append(f"{what}: label positions differ")
        for key, spec in rec["inputs"].items():
            if key not in batch.inputs:
                problems.append(f"{what}: adapter inputs lack {key!r} (has {sorted(batch.inputs)})")
                continue
            got = batch.inputs[key]
            if list(got.shape) != spec["shape"]:
                problems.append(f"{what}: {key} shape {list(got.shape)} != easyedit {spec['shape']}")
            elif "values" in spec and key != "input_ids" and got.tolist() != spec["values"]:
                problems.append(f"{what}: {key} values differ")
            elif "sum" in spec:
                v = got.detach().double()
                for name, val in (("sum", float(v.sum())), ("sum_sq", float((v * v).sum()))):
                    if not math.isclose(val, spec[name], rel_tol=1e-4, abs_tol=1e-3):
                        problems.append(f"{what}: {key} {name} {val:.6g} != easyedit {spec[name]:.6g}")
        extra = sorted(set(batch.inputs) - set(rec["inputs"]))
        if extra:
            problems.append(f"{what}: adapter inputs have keys EasyEdit does not build: {extra}")
    assert not problems, "\n".join(problems)
