"""The adapters build exactly the tensors EasyEdit main's evaluator builds (host check).

EasyEdit scores an edit with ``prepare_multimodal_hf_edit``; a method that trains on other
inputs will not show in EasyEdit's metrics. For the same request (images through the editor's
own ``vis_tok``, from JPEG files as in real runs) every tensor and the labels must be equal.
Also checks that the committed recorded fixtures still match what this EasyEdit builds.
"""

from __future__ import annotations

import json
import types
from pathlib import Path
from typing import Any

import pytest

from easyedit_host import FAMILIES, FIXED_REQUESTS, fixture_path, record_easyedit_inputs, write_images

pytestmark = pytest.mark.host


def _vis_tok(family: str) -> Any:
    from easyeditor.dataset.processor.llavaov_processors import LLaVAOneVisionProcessor
    from easyeditor.dataset.processor.qwen2vl_processors import Qwen2VLProcessor

    return LLaVAOneVisionProcessor() if family == "llava-onevision" else Qwen2VLProcessor()


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_batch_equals_easyedit_prepare(easyedit: Any, tiny_dir: Any, scratch: Path, family: str) -> None:
    import torch
    from easyeditor.evaluate.multimodal_evaluate import prepare_multimodal_hf_edit
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from mke_plugins.adapters import Query, get_adapter

    model_dir = tiny_dir(family)
    proc = AutoProcessor.from_pretrained(str(model_dir))  # what EasyEdit's editor loads
    model = AutoModelForImageTextToText.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    hparams = types.SimpleNamespace(model_name=str(model_dir), device="cpu", dtype=torch.float32)
    adapter = get_adapter(model, hparams)
    assert adapter.family == family, f"adapter detected {adapter.family!r} for {model_dir.name}"
    names = write_images(scratch / "data")
    vis_tok = _vis_tok(family)
    cases = [(vis_tok(str(scratch / "data" / names[seed % len(names)]), file_type="image"), "image", p, t)
             if seed is not None else (None, "text", p, t) for seed, p, t in FIXED_REQUESTS]
    problems = []
    for image, file_type, prompt, target in cases:
        what = f"{family} {file_type} request {prompt!r} -> {target!r}"
        ref = prepare_multimodal_hf_edit(hparams, proc, target, prompt, image, file_type)
        batch = adapter.batch(model, proc, [Query(image, prompt, target)])
        want = dict(ref["multimodal_inputs"])
        if set(want) != set(batch.inputs):
            problems.append(f"{what}: keys {sorted(batch.inputs)} != easyedit {sorted(want)}")
        for key in sorted(set(want) & set(batch.inputs)):
            a, b = batch.inputs[key], want[key]
            if a.shape != b.shape or a.dtype != b.dtype or not torch.equal(a, b):
                problems.append(f"{what}: {key} differs (adapter {tuple(a.shape)} {a.dtype}, "
                                f"easyedit {tuple(b.shape)} {b.dtype})")
        if not torch.equal(batch.labels, ref["labels"]):
            problems.append(f"{what}: labels differ\n  easyedit {ref['labels'].tolist()}\n"
                            f"  adapter  {batch.labels.tolist()}")
        if not torch.equal(batch.attention_mask, want["attention_mask"]):
            problems.append(f"{what}: Batch.attention_mask is not EasyEdit's attention_mask")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("family", FAMILIES)
def test_recorded_fixture_is_current(easyedit: Any, tiny_dir: Any, scratch: Path, family: str) -> None:
    """tests/fixtures/easyedit_inputs_<family>.json equal what this EasyEdit builds now."""
    path = fixture_path(family)
    if not path.exists():
        pytest.fail(f"{path} is missing: run tests/fixtures/make_fixtures.py in this interpreter")
    stored = json.loads(path.read_text())
    fresh = record_easyedit_inputs(family, tiny_dir(family), scratch / "images")
    for key in ("easyedit_commit", "versions"):
        stored.pop(key, None)
        fresh.pop(key, None)
    assert fresh == stored, (f"{path} is stale (EasyEdit, the tiny builder or FIXED_REQUESTS changed): "
                             "re-run tests/fixtures/make_fixtures.py")
