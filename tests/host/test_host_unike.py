"""UniKE inside EasyEdit main: the offline stage through ``MultimodalTrainer``, edits through ``MultimodalEditor``.

Both run on the bundled world model (its directory name carries EasyEdit's ``qwen2-vl`` marker)
and the world's MMEdit-format splits, with EasyEdit's own ``VQADataset``, trainer, editor,
evaluator and restore path. Skipped unless ``EASYEDIT_SRC`` is set up (see ``conftest.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.host

METHOD = "UniKE"


@pytest.fixture(scope="module")
def unike_installed(easyedit: Any) -> Any:
    """``mke_plugins.install()`` into the real EasyEdit, with UniKE registered and injected."""
    import mke_plugins

    if METHOD not in mke_plugins.get_registry():
        pytest.fail("UniKE is not registered (mke_plugins/plugins.py DEFAULT_PLUGINS)")
    report = mke_plugins.install()
    assert METHOD in report.injected, f"UniKE not injected: {report}"
    assert "UNIKE" in report.trainers, f"UniKE's trainer not injected: {report}"
    yield report
    mke_plugins.uninstall()


def _value(v: Any) -> float:
    return float(v.item() if hasattr(v, "item") else v)


def _world() -> tuple[Path, Path]:
    from mke_plugins import world

    return world.model_path(), world.data_dir()


def test_multimodal_trainer_builds_a_unike_archive(unike_installed: Any, scratch: Path) -> None:
    """EasyEdit's MultimodalTrainer trains UniKE's encoders; its save is an archive UniKE edits with."""
    import torch
    from easyeditor import MultimodalTrainer, VQADataset
    from easyeditor.util.alg_train_dict import ALG_TRAIN_DICT

    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.unike.archive import read_payload
    from mke_plugins.methods.unike.unike_hparams import UniKETrainingHparams

    assert ALG_TRAIN_DICT["UNIKE"].__name__ == "UniKETrainable"
    model_dir, data = _world()
    hp = UniKETrainingHparams.from_hparams(
        Path(__file__).resolve().parents[2] / "mke_plugins/methods/unike/hparams/training/world.yaml")
    hp.dtype = torch.bfloat16  # EasyEdit's trainer casts Qwen-VL models to bf16
    hp.results_dir = str(scratch / "results")
    hp.max_epochs, hp.max_iters = 1, 24
    hp.val_interval, hp.val_steps, hp.log_interval = 12, 4, 6
    hp.enc_batch_size = 64
    raw = json.loads((data / "train.json").read_text())
    val_path = scratch / "val.json"  # held-out train records, absolute image paths
    val_path.write_text(json.dumps([dict(r, image=str(data / r["image"]),
                                         image_rephrase=str(data / r["image_rephrase"]),
                                         m_loc=str(data / r["m_loc"])) for r in raw[-6:]]))
    train_set = VQADataset(str(data / "train.json"), size=20, config=hp)
    val_set = VQADataset(str(val_path), config=hp)
    trainer = MultimodalTrainer(config=hp, train_set=train_set, val_set=val_set)
    trainer.run()

    results = json.loads((scratch / "results" / "results.json").read_text())["results"]
    for key in ("edit/acc_val", "unike/l_tru_val", "unike/bank_size_val", "loss/total_edit_val"):
        assert key in results and math.isfinite(results[key]), f"results.json lacks a finite {key}: {results}"
    archive = scratch / "results" / "models" / "UniKE" / model_dir.name
    payload = read_payload(archive)
    meta = payload["meta"]
    assert meta["n_triplets"] > 0 and meta["dataset"] == "easyedit-trainer" and meta["state_dtype"] == "bfloat16"
    assert meta["record_hashes"], "the trainer's cond text should give record hashes"

    # the trainer's archive edits the (fp32) world model: the fingerprint is dtype-independent
    from mke_plugins import world
    from mke_plugins.methods.unike.unike_main import apply_unike_to_multimodal_model

    model, tok = world.load()
    edit = load_hparams(METHOD, "world", archive=str(archive))
    rec = world.records("edit")[0]
    edited, handle = apply_unike_to_multimodal_model(model, tok, rec, edit, return_orig_weights=True)
    assert handle.stats.flat()["final_loss"] < handle.stats.flat()["first_loss"]
    handle()


def _editor(data: Path) -> Any:
    from easyeditor import MultimodalEditor

    from mke_plugins.hparams import load_hparams

    hp = load_hparams(METHOD, "world", device="cpu", coco_image=str(data), rephrase_image=str(data))
    editor = MultimodalEditor.from_hparams(hp)
    assert editor.model_name == "qwen2-vl", f"EasyEdit detected {editor.model_name!r} for the world model"
    return editor


def test_multimodal_editor_edit_dataset_rewrite_rises(unike_installed: Any, scratch: Path) -> None:
    """alg_name UniKE in EasyEdit's MultimodalEditor: post rewrite_acc rises above pre on world edits."""
    from easyeditor import VQADataset

    _, data = _world()
    editor = _editor(data)
    ds = VQADataset(str(data / "edit.json"), size=3, config=editor.hparams)
    metrics, _, _ = editor.edit_dataset(ds, keep_original_weight=True, verbose=False)
    assert len(metrics) == 3
    pre = [_value(m["pre"]["rewrite_acc"]) for m in metrics]
    post = [_value(m["post"]["rewrite_acc"]) for m in metrics]
    assert post[0] > pre[0], f"post rewrite_acc {post} did not rise above pre {pre}"
    assert all(b >= a for a, b in zip(pre, post, strict=True)), f"post {post} fell below pre {pre}"
    for m in metrics:
        for key in ("rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc"):
            v = _value(m["post"][key])
            assert math.isfinite(v) and 0.0 <= v <= 1.0, f"post {key} = {v}"


def test_multimodal_editor_restores_and_edits_sequentially(unike_installed: Any, scratch: Path) -> None:
    """A single edit() leaves the model bit-identical; sequential_edit=True gives one entry per request."""
    from easyeditor.evaluate import compute_multimodal_hf_edit_results

    from mke_plugins import world

    from easyedit_host import snapshot_differences, state_snapshot

    _, data = _world()
    editor = _editor(data)
    recs = world.record_paths("edit")[:2]
    kwargs = {"prompts": [r["prompt"] for r in recs], "targets": [r["target"] for r in recs],
              "image": [r["image"] for r in recs], "rephrase_prompts": [r["rephrase_prompt"] for r in recs],
              "rephrase_image": [r["image_rephrase"] for r in recs]}
    for request in editor._prepare_requests(**kwargs):  # warm-up: transformers installs hooks on first forward
        compute_multimodal_hf_edit_results(editor.model, editor.model_name, editor.hparams, editor.tok, request,
                                           editor.hparams.device)
    before = state_snapshot(editor.model)
    metrics, _, _ = editor.edit(**{k: v[:1] for k, v in kwargs.items()}, verbose=False)
    assert len(metrics) == 1
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "model not restored after edit():\n" + "\n".join(diffs[:20])
    metrics, _, _ = editor.edit(**kwargs, sequential_edit=True, verbose=False)
    assert [m["case_nums"] for m in metrics] == [0, 1]
    assert _value(metrics[0]["post"]["rewrite_acc"]) > _value(metrics[0]["pre"]["rewrite_acc"])
    from mke_plugins.methods.unike import restore_all

    restore_all(editor.model)
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "restore_all did not restore:\n" + "\n".join(diffs[:20])
