"""LDKE inside EasyEdit main: the classifier through ``MultimodalTrainer``, edits through ``MultimodalEditor``.

Both run on the bundled world model (its directory name carries EasyEdit's ``qwen2-vl`` marker):
EasyEdit's own trainer drives ``LDKERouterTrainable`` (registered as ``ALG_TRAIN_DICT["LDKE"]``) on
the world's train split, once through ``mke-plugins train LDKE --trainer easyedit`` (the world
routing dataset with hard negatives) and once directly with EasyEdit's ``VQADataset`` (its
checkpoint is an archive LDKE edits with); EasyEdit's ``MultimodalEditor`` edits with
``alg_name: LDKE``. Skipped unless ``EASYEDIT_SRC`` is set up (see ``conftest.py``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.host

METHOD = "LDKE"
TRAINING_YAML = Path(__file__).resolve().parents[2] / "mke_plugins/methods/ldke/hparams/training/world.yaml"


@pytest.fixture(scope="module")
def ldke_installed(easyedit: Any) -> Any:
    """``mke_plugins.install()`` into the real EasyEdit, with LDKE and its trainer injected."""
    import mke_plugins

    if METHOD not in mke_plugins.get_registry():
        pytest.fail("LDKE is not registered (mke_plugins/plugins.py DEFAULT_PLUGINS)")
    report = mke_plugins.install()
    assert METHOD in report.injected, f"LDKE not injected: {report}"
    assert "LDKE" in report.trainers, f"LDKE's trainer not injected: {report}"
    yield report
    mke_plugins.uninstall()


def _value(v: Any) -> float:
    return float(v.item() if hasattr(v, "item") else v)


def _world() -> tuple[Path, Path]:
    from mke_plugins import world

    return world.model_path(), world.data_dir()


def _training_hparams(scratch: Path, **kw: Any) -> Any:
    from mke_plugins.hparams import read_yaml
    from mke_plugins.methods.ldke.ldke_hparams import LDKETrainingHyperParams

    cfg = read_yaml(TRAINING_YAML)
    cfg.update(results_dir=str(scratch / "results"), **kw)
    return LDKETrainingHyperParams.from_config(cfg, path=str(TRAINING_YAML))


def test_front_end_trains_through_easyedits_multimodal_trainer(ldke_installed: Any, scratch: Path) -> None:
    """`mke-plugins train LDKE --trainer easyedit`: EasyEdit's loop, the world's train split, an archive."""
    from easyeditor.trainer.MultimodalTrainer import MultimodalTrainer
    from easyeditor.util.alg_train_dict import ALG_TRAIN_DICT

    from mke_plugins import world
    from mke_plugins.methods.ldke.router import load_archive
    from mke_plugins.methods.ldke.train import train_archive
    from mke_plugins.methods.ldke.trainable import LDKERouterTrainable

    assert ALG_TRAIN_DICT["LDKE"] is LDKERouterTrainable
    assert issubclass(LDKERouterTrainable, __import__("easyeditor.trainer.algs.editable_model",
                                                      fromlist=["EditableModel"]).EditableModel)
    hp = _training_hparams(scratch, max_epochs=2, prior_edits=8, batch_size=4)
    records = world.records("train")[:32]
    out = scratch / "ldke.pt"
    seen: list[Any] = []
    original_run = MultimodalTrainer.run

    def run(self: Any) -> Any:
        seen.append(self)
        return original_run(self)

    MultimodalTrainer.run = run
    try:
        archive = train_archive(hp, out=out, trainer="easyedit", records=records, progress=False)
    finally:
        MultimodalTrainer.run = original_run
    assert len(seen) == 2 and isinstance(seen[0].model, LDKERouterTrainable), "EasyEdit's trainer did not run"
    assert seen[0].global_iter >= 1
    assert archive["meta"]["trainer"] == "easyedit" and archive["mu_count"] == 8
    assert [h["epoch"] for h in archive["meta"]["history"]] == [1, 2]
    loaded = load_archive(out)
    assert loaded["fingerprint"]["family"] == "qwen2-vl" and 0.05 <= loaded["tau"] <= 0.95


def test_multimodal_trainer_with_vqadataset_writes_an_archive_ldke_edits_with(ldke_installed: Any,
                                                                              scratch: Path) -> None:
    """EasyEdit's own VQADataset + MultimodalTrainer (alg: LDKE); its checkpoint drives an edit."""
    from easyeditor import MultimodalTrainer, VQADataset

    from mke_plugins import world
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.ldke.ldke_main import apply_ldke_to_multimodal_model

    model_dir, data = _world()
    hp = _training_hparams(scratch, dtype="bfloat16", max_epochs=1, max_iters=16, prior_edits=6, batch_size=2,
                           val_batch_size=2, val_interval=6, val_steps=2, log_interval=4, final_eval=True,
                           debug=False, save=True, hard_negatives=False)
    raw = json.loads((data / "train.json").read_text())
    val_path = scratch / "val.json"
    val_path.write_text(json.dumps([dict(r, image=str(data / r["image"]), image_rephrase=str(data / r["image_rephrase"]),
                                         m_loc=str(data / r["m_loc"])) for r in raw[-4:]]))
    train_set = VQADataset(str(data / "train.json"), size=16, config=hp)
    val_set = VQADataset(str(val_path), config=hp)
    trainer = MultimodalTrainer(config=hp, train_set=train_set, val_set=val_set)
    trainer.run()
    results = json.loads((scratch / "results" / "results.json").read_text())["results"]
    for key in ("edit/acc_val", "loss/loc_val", "loss/total_edit_val", "mu_count_val"):
        assert key in results and math.isfinite(results[key]), f"results.json lacks a finite {key}: {results}"
    checkpoint = scratch / "results" / "models" / "LDKE" / model_dir.name
    assert checkpoint.is_file()
    model, tok = world.load()
    edit_hp = load_hparams(METHOD, "world", classifier_archive=str(checkpoint))
    rec = world.records("edit")[0]
    edited, handle = apply_ldke_to_multimodal_model(model, tok, rec, edit_hp, return_orig_weights=True)
    assert handle.stats["fit_success"], handle.stats
    handle()


def _editor(data: Path) -> Any:
    from easyeditor import MultimodalEditor

    from mke_plugins.hparams import load_hparams

    hp = load_hparams(METHOD, "world", device="cpu", coco_image=str(data), rephrase_image=str(data))
    editor = MultimodalEditor.from_hparams(hp)
    assert editor.model_name == "qwen2-vl", f"EasyEdit detected {editor.model_name!r} for the world model"
    return editor


def test_multimodal_editor_edit_dataset_rewrite_rises(ldke_installed: Any, scratch: Path) -> None:
    """alg_name LDKE in EasyEdit's MultimodalEditor: post rewrite_acc rises above pre on world edits."""
    from easyeditor import VQADataset

    _, data = _world()
    editor = _editor(data)
    ds = VQADataset(str(data / "edit.json"), size=3, config=editor.hparams)
    metrics, _, _ = editor.edit_dataset(ds, keep_original_weight=True, verbose=False)
    assert len(metrics) == 3
    pre = [_value(m["pre"]["rewrite_acc"]) for m in metrics]
    post = [_value(m["post"]["rewrite_acc"]) for m in metrics]
    assert post[0] > pre[0], f"post rewrite_acc {post} did not rise above pre {pre}"
    assert all(b >= a for a, b in zip(pre, post)), f"post {post} fell below pre {pre}"
    for m in metrics:
        for key in ("rephrase_acc", "image_rephrase_acc", "locality_acc", "multimodal_locality_acc"):
            v = _value(m["post"][key])
            assert math.isfinite(v) and 0.0 <= v <= 1.0, f"post {key} = {v}"
    from mke_plugins.methods.ldke.edit import clear

    assert clear(editor.model) == 3  # edit_dataset() never restores: the three edits are still there


def test_multimodal_editor_restores_and_edits_sequentially(ldke_installed: Any, scratch: Path) -> None:
    """A single edit() leaves the model bit-identical; sequential_edit=True gives one entry per request."""
    from easyedit_host import snapshot_differences, state_snapshot
    from easyeditor.evaluate import compute_multimodal_hf_edit_results

    from mke_plugins import world
    from mke_plugins.methods.ldke.edit import clear

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
    assert _value(metrics[0]["post"]["rewrite_acc"]) == 1.0
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "model not restored after edit():\n" + "\n".join(diffs[:20])
    metrics, _, _ = editor.edit(**kwargs, sequential_edit=True, verbose=False)
    assert [m["case_nums"] for m in metrics] == [0, 1]
    for m in metrics:
        assert _value(m["post"]["rewrite_acc"]) > _value(m["pre"]["rewrite_acc"])
    assert clear(editor.model) == 2
    diffs = snapshot_differences(before, state_snapshot(editor.model))
    assert not diffs, "clear() did not restore:\n" + "\n".join(diffs[:20])
