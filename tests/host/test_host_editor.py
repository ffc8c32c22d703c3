"""EasyEdit main's own MultimodalEditor runs a plugin method, on tiny Qwen2-VL / LLaVA-OV / Qwen3-VL.

The example plugin's ``HelloFT`` (examples/mke-hello: a real fine-tune of one MLP ``down_proj``)
is selected by ``alg_name`` after ``mke_plugins.install()``, and EasyEdit's editor, evaluator and
``VQADataset`` do everything else: loading the model by path, building requests, scoring,
restoring. Assertions follow ``hooks/EASYEDIT-NOTES.md``, "What the host tests assert"; pre versus
post of a single ``edit()`` is deliberately not checked (EasyEdit measures both on the edited
model).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from easyedit_host import (
    FAMILIES,
    HELLO_METHOD,
    HELLO_TINY_OVERRIDES,
    METRIC_KEYS,
    editor_inputs,
    mmedit_records,
    pick_hparams_model,
    snapshot_differences,
    state_snapshot,
    write_images,
    write_vqa_file,
)

pytestmark = pytest.mark.host


def _hparams(family: str, model_dir: Path, data_dir: Path) -> Any:
    import mke_plugins

    entry = mke_plugins.get_registry().get(HELLO_METHOD)
    model_key = pick_hparams_model(entry.hparams_models(), family)
    hp = mke_plugins.load_hparams(HELLO_METHOD, model_key, model_name=str(model_dir), name=str(model_dir),
                                  device="cpu", dtype="float32", coco_image=str(data_dir),
                                  rephrase_image=str(data_dir), **HELLO_TINY_OVERRIDES)
    assert hp.alg_name == HELLO_METHOD, f"load_hparams gave alg_name {hp.alg_name!r}"
    return hp


def _editor(easyedit: Any, family: str, model_dir: Path, data_dir: Path) -> Any:
    from easyeditor import MultimodalEditor

    editor = MultimodalEditor.from_hparams(_hparams(family, model_dir, data_dir))
    assert editor.model_name == family, (
        f"EasyEdit detected family {editor.model_name!r} from model_name {str(model_dir)!r}, expected {family!r}")
    return editor


def _value(v: Any) -> float:
    return float(v.item() if hasattr(v, "item") else v)


def _check_post_metrics(metrics: list[dict[str, Any]]) -> None:
    for i, m in enumerate(metrics):
        post = m["post"]
        missing = [k for k in METRIC_KEYS if k not in post]
        assert not missing, f"record {i}: post lacks {missing}; has {sorted(post)}"
        for k in METRIC_KEYS:
            v = _value(post[k])
            assert math.isfinite(v) and 0.0 <= v <= 1.0, f"record {i}: post {k} = {v}, not in [0, 1]"


def _check_rewrite_rises(metrics: list[dict[str, Any]]) -> tuple[list[float], list[float]]:
    pre = [_value(m["pre"]["rewrite_acc"]) for m in metrics]
    post = [_value(m["post"]["rewrite_acc"]) for m in metrics]
    assert post[0] > pre[0], f"first record: post rewrite_acc {post[0]} did not rise above pre {pre[0]}"
    fell = [i for i, (a, b) in enumerate(zip(pre, post, strict=True)) if b < a]
    assert not fell, f"post rewrite_acc fell below pre on records {fell}: pre {pre}, post {post}"
    return pre, post


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_dataset_rewrite_rises(easyedit: Any, mke_installed: Any, tiny_dir: Any, scratch: Path,
                                    family: str) -> None:
    """edit_dataset(): pre is measured before each edit; post rewrite_acc must rise on record 0."""
    from easyeditor import VQADataset

    data = scratch / "data"
    json_path = write_vqa_file(data, count=2)
    editor = _editor(easyedit, family, tiny_dir(family), data)
    ds = VQADataset(str(json_path), config=editor.hparams)
    assert len(ds) == 2, f"VQADataset kept {len(ds)} of 2 records"
    metrics, edited_model, _ = editor.edit_dataset(ds, keep_original_weight=True, verbose=False)
    assert len(metrics) == 2
    _check_post_metrics(metrics)
    _check_rewrite_rises(metrics)
    assert (scratch / "logs" / "run.log").exists(), "EasyEdit's editor should log to ./logs/run.log (cwd)"


@pytest.mark.parametrize("family", FAMILIES)
def test_sequential_edit_one_entry_per_request(easyedit: Any, mke_installed: Any, tiny_dir: Any,
                                               scratch: Path, family: str) -> None:
    """edit(sequential_edit=True) hands the method a bare dict; we must return one entry per request."""
    data = scratch / "data"
    write_images(data)
    records = mmedit_records(2)
    editor = _editor(easyedit, family, tiny_dir(family), data)
    metrics, _, _ = editor.edit(**editor_inputs(records, data), sequential_edit=True, verbose=False)
    assert len(metrics) == len(records), f"{len(metrics)} metrics entries for {len(records)} requests"
    assert [m["case_nums"] for m in metrics] == list(range(len(records)))
    _check_post_metrics(metrics)
    _check_rewrite_rises(metrics)


@pytest.mark.parametrize("family", FAMILIES)
def test_single_edit_restores_bit_identically(easyedit: Any, mke_installed: Any, tiny_dir: Any,
                                              scratch: Path, family: str) -> None:
    """After edit() the model is bit-identical (values, dtypes, devices, flags, modes, hooks);
    applying the returned weights_copy again changes nothing."""
    import torch
    from easyeditor.editors.utils import restore_after_edit

    data = scratch / "data"
    write_images(data)
    records = mmedit_records(1)
    editor = _editor(easyedit, family, tiny_dir(family), data)
    # transformers 5 installs its output-capturing forward hooks on each sub-model at that
    # sub-model's first forward; run EasyEdit's evaluator once so they exist before the snapshot.
    from easyeditor.evaluate import compute_multimodal_hf_edit_results

    for request in editor._prepare_requests(**editor_inputs(records, data)):
        compute_multimodal_hf_edit_results(editor.model, editor.model_name, editor.hparams, editor.tok,
                                           request, editor.hparams.device)
    before = state_snapshot(editor.model)
    model_before = editor.model
    metrics, edited_model, weights_copy = editor.edit(**editor_inputs(records, data), verbose=False)
    assert len(metrics) == 1
    _check_post_metrics(metrics)
    assert editor.model is model_before, "restore replaced editor.model"
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "model not restored after edit():\n" + "\n".join(diffs[:20])

    # test_edit_changes_weights_before_restore shows the edit itself is real.
    assert weights_copy is not None, "HelloFT returned weights_copy=None: EasyEdit would leave the model edited"

    # Restore again, both ways EasyEdit may do it: calling it, and the editor's own restore path.
    if callable(weights_copy):
        with torch.no_grad():
            weights_copy()
    restore_after_edit(editor, edited_model, weights_copy)
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "restoring a second time changed the model:\n" + "\n".join(diffs[:20])


@pytest.mark.parametrize("family", FAMILIES)
def test_edit_changes_weights_before_restore(easyedit: Any, mke_installed: Any, tiny_dir: Any,
                                             scratch: Path, family: str) -> None:
    """The injected apply, called as EasyEdit calls it, really edits: post rewrite_acc on the
    returned model beats the untouched model's, and restoring brings the weights back."""
    import torch
    from easyeditor.evaluate import compute_multimodal_hf_edit_results

    data = scratch / "data"
    write_images(data)
    records = mmedit_records(1)
    editor = _editor(easyedit, family, tiny_dir(family), data)
    request = editor._prepare_requests(**{k: v for k, v in editor_inputs(records, data).items()
                                          if k != "locality_inputs"})[0]
    pre = _value(compute_multimodal_hf_edit_results(editor.model, editor.model_name, editor.hparams, editor.tok,
                                                    request, editor.hparams.device)["rewrite_acc"])
    before = state_snapshot(editor.model)
    edited, weights_copy = editor.apply_algo(editor.model, editor.tok, [request], editor.hparams, copy=False,
                                             return_orig_weights=True, keep_original_weight=False)
    post = _value(compute_multimodal_hf_edit_results(edited, editor.model_name, editor.hparams, editor.tok,
                                                     request, editor.hparams.device)["rewrite_acc"])
    assert post > pre, f"HelloFT did not raise rewrite_acc: pre {pre}, post {post}"
    from easyeditor.editors.utils import restore_after_edit

    with torch.no_grad():
        restore_after_edit(editor, edited, weights_copy)
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "EasyEdit's restore path did not restore:\n" + "\n".join(diffs[:20])
