"""EasyEdit main's own MultimodalEditor runs ``alg_name: ASAM`` on the bundled world model.

After ``mke_plugins.install()``, EasyEdit loads the world model by path (its directory carries the
``qwen2-vl`` marker), its ``VQADataset`` reads the world's ``edit.json``, and its editor,
evaluator and restore path do the rest, with ASAM's own world YAML. Assertions follow
``hooks/EASYEDIT-NOTES.md`` ("What the host tests assert"): post ``rewrite_acc`` rises
(``edit_dataset``: pre measured before each edit;
``sequential_edit``: pre cached before any edit), one metrics entry per request in sequential
mode (the bare dict went through our normalisation), and a single ``edit()`` leaves the model
bit-identical. Skipped unless the host check is set up (``EASYEDIT_SRC``, see conftest.py).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from world_host import check_metrics, edit_dataset, install, single_edit_restores, value, world_editor, world_inputs

pytestmark = pytest.mark.host

METHOD = "ASAM"
CASES = 3


@pytest.fixture(scope="module")
def asam_installed(easyedit: Any) -> Any:
    """``mke_plugins.install()`` into the real EasyEdit, with ASAM injected."""
    yield from install(METHOD)


def _records(n: int) -> list[dict[str, Any]]:
    from mke_plugins import world

    return world.record_paths("edit")[:n]


def test_edit_dataset_on_the_world_rewrite_rises(easyedit: Any, asam_installed: Any, scratch: Path) -> None:
    editor = world_editor(METHOD, dtype="float32")
    pre, post = check_metrics(edit_dataset(editor, CASES))
    assert post == [1.0] * CASES, f"ASAM should reach every target token on the world: post {post}"


def test_sequential_edit_on_the_world(easyedit: Any, asam_installed: Any, scratch: Path) -> None:
    editor = world_editor(METHOD, dtype="float32")
    metrics, _, _ = editor.edit(**world_inputs(_records(2)), sequential_edit=True, verbose=False)
    assert len(metrics) == 2 and [m["case_nums"] for m in metrics] == [0, 1]
    check_metrics(metrics)


def test_single_edit_restores_bit_identically(easyedit: Any, asam_installed: Any, scratch: Path) -> None:
    import torch
    from easyeditor.editors.utils import restore_after_edit

    from easyedit_host import snapshot_differences, state_snapshot

    editor = world_editor(METHOD, dtype="float32")
    inputs = world_inputs(_records(1))
    before, metrics = single_edit_restores(editor, inputs)
    assert value(metrics[0]["post"]["rewrite_acc"]) == 1.0
    # EasyEdit's own restore path on a returned weights copy is harmless after our restore
    inputs = {k: v for k, v in inputs.items() if k != "locality_inputs"}
    _, edited_model, weights_copy = editor.edit(**inputs, verbose=False)
    with torch.no_grad():
        weights_copy()
    restore_after_edit(editor, edited_model, weights_copy)
    assert not snapshot_differences(before, state_snapshot(editor.model))
