"""EasyEdit main's own ``MultimodalEditor`` runs ``alg_name: DECODE``: world model, tiny Qwen3-VL and LLaVA-OV.

After ``mke_plugins.install()``, EasyEdit loads each model by path, builds the requests, calls our
apply function, evaluates and restores with its own code, unmodified. On the bundled world model
DECODE runs with its own ``hparams/world.yaml`` and EasyEdit's ``VQADataset`` over the world's
``edit.json``; on the tiny random Qwen3-VL and LLaVA-OneVision models it runs with the bundled
real-family YAML (``qwen3vl-4b``, ``llavaov-7b``), loaded through EasyEdit's own hparams path, with
only the sizes a 4-layer, d_ff-64 random model needs overridden (:data:`TINY_OVERRIDES`).

Assertions follow ``hooks/EASYEDIT-NOTES.md`` ("What the host tests assert"): post
``rewrite_acc`` rises (``edit_dataset`` measures pre
before each edit; ``sequential_edit`` caches pre before any edit), one metrics entry per request
in sequential mode, and a single ``edit()`` leaves the model bit-identical (DECODE folds in
place; EasyEdit's restore path copies the saved columns back). Pre versus post of a single
``edit()`` is not compared: EasyEdit measures pre on the already edited model.
Skipped unless the host check is set up (``EASYEDIT_SRC``, see conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from easyedit_host import (
    editor_inputs,
    mmedit_records,
    snapshot_differences,
    state_snapshot,
    write_images,
    write_vqa_file,
)
from world_host import check_metrics, edit_dataset, install, value, warm_up, world_editor, world_inputs

pytestmark = pytest.mark.host

METHOD = "DECODE"
WORLD_CASES = 3

#: the bundled YAML of each tiny family (the real model's values)
TINY_FAMILIES: dict[str, str] = {"qwen3-vl": "qwen3vl-4b", "llava-onevision": "llavaov-7b"}

#: what a 4-layer random model with d_ff 64 needs instead of the 7B values: the 7B YAMLs exclude
#: the last 3 of 32 layers and take 40 neurons per token (the DECODE README's "Defaults" says
#: why the world YAML differs), and
#: 200 steps at lr 2e-3 are made for a trained model; a random one needs a larger step to move
#: its multi-token targets within a few dozen steps
TINY_OVERRIDES: dict[str, object] = {"num_last_layers_excluded": 1, "topk_per_token": 8,
                                     "max_neurons_per_group": 8, "lr": 3e-2, "max_steps": 40}


@pytest.fixture(scope="module")
def decode_installed(easyedit: Any) -> Any:
    """``mke_plugins.install()`` into the real EasyEdit, with DECODE registered and injected."""
    yield from install(METHOD)


def _single_edit_restores(editor: Any, inputs: dict[str, Any]) -> list[dict[str, Any]]:
    """One edit(): EasyEdit measures post on the edited model, then restores; the model must be
    bit-identical, and restoring again (called, then EasyEdit's own path) must change nothing."""
    import torch
    from easyeditor.editors.utils import restore_after_edit

    warm_up(editor, inputs)
    before = state_snapshot(editor.model)
    model_before = editor.model
    metrics, edited_model, weights_copy = editor.edit(**inputs, verbose=False)
    assert len(metrics) == 1
    assert editor.model is model_before, "restore replaced editor.model"
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "model not restored after edit():\n" + "\n".join(diffs[:20])
    assert weights_copy is not None and weights_copy.restored, f"weights_copy was not used to restore: {weights_copy!r}"
    with torch.no_grad():
        weights_copy()
    restore_after_edit(editor, edited_model, weights_copy)
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "restoring a second time changed the model:\n" + "\n".join(diffs[:20])
    return metrics


# -- the bundled world model, DECODE's own world YAML -----------------------------------------------

def _world_records(n: int) -> list[dict[str, Any]]:
    """The first ``n`` world edit records, with absolute image paths."""
    from mke_plugins import world

    return world.record_paths("edit")[:n]


def test_world_edit_dataset_rewrite_rises(decode_installed: Any, scratch: Path) -> None:
    """EasyEdit's VQADataset over the world's edit.json: every record's rewrite rises to the target."""
    pre, post = check_metrics(edit_dataset(world_editor(METHOD, dtype="float32"), WORLD_CASES))
    assert pre == [0.0] * WORLD_CASES, f"the world's edit targets are new answers: pre {pre}"
    assert post == [1.0] * WORLD_CASES, f"DECODE should reach each of these world targets: post {post}"


def test_world_sequential_edit(decode_installed: Any, scratch: Path) -> None:
    editor = world_editor(METHOD, dtype="float32")
    metrics, _, _ = editor.edit(**world_inputs(_world_records(2)), sequential_edit=True, verbose=False)
    assert len(metrics) == 2 and [m["case_nums"] for m in metrics] == [0, 1]
    check_metrics(metrics)


def test_world_single_edit_restores_bit_identically(decode_installed: Any, scratch: Path) -> None:
    metrics = _single_edit_restores(world_editor(METHOD, dtype="float32"), world_inputs(_world_records(1)))
    assert value(metrics[0]["post"]["rewrite_acc"]) == 1.0, "the edit before the restore did not take"


# -- tiny Qwen3-VL and LLaVA-OneVision, the bundled real-family YAMLs ---------------------------------

def _tiny_editor(family: str, model_dir: Path, data_dir: Path) -> Any:
    from easyeditor import MultimodalEditor

    import mke_plugins

    key = TINY_FAMILIES[family]
    assert key in mke_plugins.get_registry().get(METHOD).hparams_models(), f"DECODE bundles no {key}.yaml"
    hp = mke_plugins.load_hparams(METHOD, key, model_name=str(model_dir), name=str(model_dir), device="cpu",
                                  dtype="float32", coco_image=str(data_dir), rephrase_image=str(data_dir),
                                  **TINY_OVERRIDES)
    assert hp.alg_name == METHOD and hp.append_eos and hp.stage_order == "text_first"
    editor = MultimodalEditor.from_hparams(hp)
    assert editor.model_name == family, (
        f"EasyEdit detected family {editor.model_name!r} from model_name {str(model_dir)!r}, expected {family!r}")
    return editor


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_edit_dataset_rewrite_rises(decode_installed: Any, tiny_dir: Any, scratch: Path, family: str) -> None:
    """edit_dataset(): pre is measured before each edit; post rewrite_acc must rise."""
    from easyeditor import VQADataset

    data = scratch / "data"
    json_path = write_vqa_file(data, count=2)
    editor = _tiny_editor(family, tiny_dir(family), data)
    ds = VQADataset(str(json_path), config=editor.hparams)
    assert len(ds) == 2, f"VQADataset kept {len(ds)} of 2 records"
    metrics, _, _ = editor.edit_dataset(ds, keep_original_weight=True, verbose=False)
    assert len(metrics) == 2
    pre, post = check_metrics(metrics)
    assert all(b > a for a, b in zip(pre, post, strict=True)), \
        f"each record's rewrite_acc should rise: pre {pre}, post {post}"
    print(f"{family}: rewrite_acc pre {pre} post {post}")


@pytest.mark.parametrize("family", sorted(TINY_FAMILIES))
def test_tiny_sequential_edit_and_single_restore(decode_installed: Any, tiny_dir: Any, scratch: Path,
                                                 family: str) -> None:
    """sequential_edit hands DECODE a bare dict per request (one entry each, pre cached before any
    edit); a single edit() afterwards leaves the freshly loaded model bit-identical."""
    data = scratch / "data"
    write_images(data)
    records = mmedit_records(2)
    editor = _tiny_editor(family, tiny_dir(family), data)
    metrics, _, _ = editor.edit(**editor_inputs(records, data), sequential_edit=True, verbose=False)
    assert len(metrics) == 2 and [m["case_nums"] for m in metrics] == [0, 1]
    check_metrics(metrics)
    _single_edit_restores(_tiny_editor(family, tiny_dir(family), data), editor_inputs(records[:1], data))
