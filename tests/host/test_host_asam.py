"""EasyEdit main's own MultimodalEditor runs ``alg_name: ASAM`` on the bundled world model.

After ``mke_plugins.install()``, EasyEdit loads the world model by path (its directory carries the
``qwen2-vl`` marker), its ``VQADataset`` reads the world's ``edit.json``, and its editor,
evaluator and restore path do the rest, with ASAM's own world YAML. Assertions follow
EASYEDIT.md §9: post ``rewrite_acc`` rises (``edit_dataset``: pre measured before each edit;
``sequential_edit``: pre cached before any edit), one metrics entry per request in sequential
mode (the bare dict went through our normalisation), and a single ``edit()`` leaves the model
bit-identical. Skipped unless the host check is set up (``EASYEDIT_SRC``, see conftest.py).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from easyedit_host import snapshot_differences, state_snapshot

pytestmark = pytest.mark.host

METHOD = "ASAM"
CASES = 3


@pytest.fixture(scope="module")
def asam_installed(easyedit: Any) -> Any:
    """``mke_plugins.install()`` into the real EasyEdit, with ASAM registered (else skip)."""
    import mke_plugins

    if METHOD not in mke_plugins.get_registry():
        pytest.skip(f"{METHOD} is not registered (mke_plugins/plugins.py DEFAULT_PLUGINS)")
    report = mke_plugins.install()
    assert METHOD in report.injected, f"{METHOD} was not injected into EasyEdit: {report}"
    yield report
    mke_plugins.uninstall()


@pytest.fixture(scope="module")
def world_paths() -> tuple[Path, Path, list[dict[str, Any]]]:
    """(world model dir, world data dir, the first edit records with absolute image paths)."""
    from mke_plugins import world

    return world.model_path(), world.data_dir(), world.record_paths("edit")[:CASES]


def _editor(world_paths: Any) -> Any:
    import mke_plugins
    from easyeditor import MultimodalEditor

    model_dir, data_dir, _ = world_paths
    hp = mke_plugins.load_hparams(METHOD, "world", device="cpu", dtype="float32")
    assert hp.alg_name == METHOD and hp.model_name == str(model_dir) and hp.coco_image == str(data_dir)
    editor = MultimodalEditor.from_hparams(hp)
    assert editor.model_name == "qwen2-vl", f"EasyEdit detected family {editor.model_name!r} for the world model"
    return editor


def _value(v: Any) -> float:
    return float(v.item() if hasattr(v, "item") else v)


def _check(metrics: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    for i, m in enumerate(metrics):
        for k in ("rewrite_acc", "rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc"):
            v = _value(m["post"][k])
            assert math.isfinite(v) and 0.0 <= v <= 1.0, f"record {i}: post {k} = {v}"
    pre = [_value(m["pre"]["rewrite_acc"]) for m in metrics]
    post = [_value(m["post"]["rewrite_acc"]) for m in metrics]
    assert post[0] > pre[0], f"first record: post rewrite_acc {post[0]} did not rise above pre {pre[0]}"
    assert all(b >= a for a, b in zip(pre, post)), f"post rewrite_acc fell below pre: pre {pre}, post {post}"
    return pre, post


def _inputs(records: list[dict[str, Any]]) -> dict[str, Any]:
    return {
        "prompts": [r["prompt"] for r in records],
        "targets": [r["target"] for r in records],
        "image": [r["image"] for r in records],
        "rephrase_prompts": [r["rephrase_prompt"] for r in records],
        "rephrase_image": [r["image_rephrase"] for r in records],
        "locality_inputs": {
            "text": {"prompt": [r["locality_prompt"] for r in records],
                     "ground_truth": [r["locality_ground_truth"] for r in records]},
            "vision": {"image": [r["multimodal_locality_image"] for r in records],
                       "prompt": [r["multimodal_locality_prompt"] for r in records],
                       "ground_truth": [r["multimodal_locality_ground_truth"] for r in records]},
        },
    }


def test_edit_dataset_on_the_world_rewrite_rises(easyedit: Any, asam_installed: Any, world_paths: Any,
                                                 scratch: Path) -> None:
    from easyeditor import VQADataset

    editor = _editor(world_paths)
    _, data_dir, _ = world_paths
    ds = VQADataset(str(data_dir / "edit.json"), size=CASES, config=editor.hparams)
    assert len(ds) == CASES
    metrics, _, _ = editor.edit_dataset(ds, keep_original_weight=True, verbose=False)
    assert len(metrics) == CASES
    pre, post = _check(metrics)
    assert post == [1.0] * CASES, f"ASAM should reach every target token on the world: post {post}"


def test_sequential_edit_on_the_world(easyedit: Any, asam_installed: Any, world_paths: Any, scratch: Path) -> None:
    editor = _editor(world_paths)
    records = world_paths[2][:2]
    metrics, _, _ = editor.edit(**_inputs(records), sequential_edit=True, verbose=False)
    assert len(metrics) == len(records) and [m["case_nums"] for m in metrics] == [0, 1]
    _check(metrics)


def test_single_edit_restores_bit_identically(easyedit: Any, asam_installed: Any, world_paths: Any,
                                              scratch: Path) -> None:
    import torch
    from easyeditor.editors.utils import restore_after_edit
    from easyeditor.evaluate import compute_multimodal_hf_edit_results

    editor = _editor(world_paths)
    records = world_paths[2][:1]
    # transformers installs output-capturing hooks at a sub-model's first forward: warm up first
    for request in editor._prepare_requests(**_inputs(records)):
        compute_multimodal_hf_edit_results(editor.model, editor.model_name, editor.hparams, editor.tok, request,
                                           editor.hparams.device)
    before = state_snapshot(editor.model)
    metrics, edited_model, weights_copy = editor.edit(**_inputs(records), verbose=False)
    assert _value(metrics[0]["post"]["rewrite_acc"]) == 1.0
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "model not restored after edit():\n" + "\n".join(diffs[:20])
    with torch.no_grad():
        weights_copy()
    restore_after_edit(editor, edited_model, weights_copy)
    assert not snapshot_differences(before, state_snapshot(editor.model))
