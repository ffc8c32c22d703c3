"""The steps every per-method host test takes on the bundled world, written once.

Each ``test_host_<method>.py`` checks the same EasyEdit contract (``hooks/EASYEDIT-NOTES.md``,
"MultimodalTrainer and EditableModel" and "Host check") for its own method: the method is injected
into EasyEdit main, EasyEdit's ``MultimodalEditor`` is built from the method's world YAML and
loads the world model by path, post ``rewrite_acc`` rises, a single ``edit()`` leaves the model
bit-identical, and (for methods with an offline stage) EasyEdit's ``MultimodalTrainer`` runs on
the world's train split. The method files keep only what is specific to their method.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Iterator

import pytest

from easyedit_host import snapshot_differences, state_snapshot

LOCALITY_KEYS = ("rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc")


def install(method: str, *, trainer_key: str | None = None) -> Iterator[Any]:
    """Body of a module fixture: ``mke_plugins.install()`` with ``method`` (and its trainer) injected."""
    import mke_plugins

    if method not in mke_plugins.get_registry():
        pytest.fail(f"{method} is not registered (mke_plugins/plugins.py DEFAULT_PLUGINS)")
    report = mke_plugins.install()
    assert method in report.injected, f"{method} was not injected into EasyEdit: {report}"
    if trainer_key is not None:
        assert trainer_key in report.trainers, f"{method}'s trainer was not injected: {report}"
    yield report
    mke_plugins.uninstall()


def world_dirs() -> tuple[Path, Path]:
    """(bundled world model directory, world data directory)."""
    from mke_plugins import world

    return world.model_path(), world.data_dir()


def world_editor(method: str, **overrides: Any) -> Any:
    """EasyEdit's ``MultimodalEditor`` from ``method``'s world YAML (CPU unless overridden)."""
    from easyeditor import MultimodalEditor

    from mke_plugins.hparams import load_hparams

    hp = load_hparams(method, "world", **{"device": "cpu", **overrides})
    model_dir, data_dir = world_dirs()
    assert hp.alg_name == method and hp.model_name == str(model_dir) and hp.coco_image == str(data_dir)
    editor = MultimodalEditor.from_hparams(hp)
    assert editor.model_name == "qwen2-vl", f"EasyEdit detected family {editor.model_name!r} for the world model"
    return editor


def value(v: Any) -> float:
    """A metric EasyEdit returns as a float, a 0-d tensor or a numpy scalar, as a float."""
    return float(v.item() if hasattr(v, "item") else v)


def check_metrics(metrics: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    """Every post metric is finite in [0, 1]; the first record's rewrite_acc rises, none falls."""
    for i, m in enumerate(metrics):
        for key in ("rewrite_acc", *LOCALITY_KEYS):
            v = value(m["post"][key])
            assert math.isfinite(v) and 0.0 <= v <= 1.0, f"record {i}: post {key} = {v}"
    pre = [value(m["pre"]["rewrite_acc"]) for m in metrics]
    post = [value(m["post"]["rewrite_acc"]) for m in metrics]
    assert post[0] > pre[0], f"first record: post rewrite_acc {post[0]} did not rise above pre {pre[0]}"
    assert all(b >= a for a, b in zip(pre, post, strict=True)), \
        f"post rewrite_acc fell below pre: pre {pre}, post {post}"
    return pre, post


def world_inputs(records: list[dict[str, Any]]) -> dict[str, Any]:
    """``MultimodalEditor.edit`` keyword arguments for world records (absolute image paths)."""
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


def edit_dataset(editor: Any, cases: int) -> list[dict[str, Any]]:
    """EasyEdit's ``edit_dataset`` over the first ``cases`` world edit records (VQADataset)."""
    from easyeditor import VQADataset

    _, data_dir = world_dirs()
    ds = VQADataset(str(data_dir / "edit.json"), size=cases, config=editor.hparams)
    assert len(ds) == cases
    metrics, _, _ = editor.edit_dataset(ds, keep_original_weight=True, verbose=False)
    assert len(metrics) == cases
    return metrics


def warm_up(editor: Any, inputs: dict[str, Any]) -> None:
    """Evaluate once before snapshotting: transformers installs hooks on a sub-model's first forward."""
    from easyeditor.evaluate import compute_multimodal_hf_edit_results

    for request in editor._prepare_requests(**inputs):
        compute_multimodal_hf_edit_results(editor.model, editor.model_name, editor.hparams, editor.tok, request,
                                           editor.hparams.device)


def single_edit_restores(editor: Any, inputs: dict[str, Any]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One ``edit()`` of the first request leaves the model bit-identical; returns (snapshot, metrics)."""
    first = {k: v[:1] for k, v in inputs.items() if k != "locality_inputs"}
    warm_up(editor, first)
    before = state_snapshot(editor.model)
    metrics, _, _ = editor.edit(**first, verbose=False)
    assert len(metrics) == 1
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "model not restored after edit():\n" + "\n".join(diffs[:20])
    return before, metrics


def assert_restored(editor: Any, before: dict[str, Any], how: str) -> None:
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, f"{how} did not restore:\n" + "\n".join(diffs[:20])


def run_world_trainer(hp: Any, scratch: Path, *, train_size: int, val_records: int) -> dict[str, Any]:
    """EasyEdit's ``MultimodalTrainer`` on the world's train split; returns its results.json ``results``.

    Validation uses the last ``val_records`` train records, written with absolute image paths.
    """
    from easyeditor import MultimodalTrainer, VQADataset

    _, data = world_dirs()
    hp.results_dir = str(scratch / "results")
    raw = json.loads((data / "train.json").read_text())
    val_path = scratch / "val.json"
    val_path.write_text(json.dumps([dict(r, image=str(data / r["image"]),
                                         image_rephrase=str(data / r["image_rephrase"]),
                                         m_loc=str(data / r["m_loc"])) for r in raw[-val_records:]]))
    train_set = VQADataset(str(data / "train.json"), size=train_size, config=hp)
    val_set = VQADataset(str(val_path), config=hp)
    MultimodalTrainer(config=hp, train_set=train_set, val_set=val_set).run()
    return json.loads((scratch / "results" / "results.json").read_text())["results"]
