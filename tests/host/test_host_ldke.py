"""LDKE inside EasyEdit main: the classifier through ``MultimodalTrainer``, edits through ``MultimodalEditor``.

Both run on the bundled world model (its directory name carries EasyEdit's ``qwen2-vl`` marker):
EasyEdit's own trainer drives ``LDKERouterTrainable`` (registered as ``ALG_TRAIN_DICT["LDKE"]``) on
the world's train split, once through ``mke-plugins train LDKE --trainer easyedit`` (the world
routing dataset with hard negatives) and once directly with EasyEdit's ``VQADataset`` (its
checkpoint is an archive LDKE edits with); EasyEdit's ``MultimodalEditor`` edits with
``alg_name: LDKE``. Skipped unless ``EASYEDIT_SRC`` is set up (see ``conftest.py``).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import pytest

from world_host import (
    assert_restored,
    check_metrics,
    edit_dataset,
    install,
    run_world_trainer,
    single_edit_restores,
    value,
    world_dirs,
    world_editor,
    world_inputs,
)

pytestmark = pytest.mark.host

METHOD = "LDKE"
TRAINING_YAML = Path(__file__).resolve().parents[2] / "mke_plugins/methods/ldke/hparams/training/world.yaml"


@pytest.fixture(scope="module")
def ldke_installed(easyedit: Any) -> Any:
    """``mke_plugins.install()`` into the real EasyEdit, with LDKE and its trainer injected."""
    yield from install(METHOD, trainer_key="LDKE")


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
    from mke_plugins.methods.ldke.ldke_train import train_archive
    from mke_plugins.methods.ldke.router import load_archive
    from mke_plugins.methods.ldke.trainable import LDKERouterTrainable
    from mke_plugins.train import make_trainer

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
        model, tok = world.load()
        archive = train_archive(hp, out=out, trainer="easyedit", records=records, model=model, tok=tok,
                                make_trainer=make_trainer, progress=False)
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
    from mke_plugins import world
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.ldke.ldke_main import apply_ldke_to_multimodal_model

    model_dir, _ = world_dirs()
    hp = _training_hparams(scratch, dtype="bfloat16", max_epochs=1, max_iters=16, prior_edits=6, batch_size=2,
                           val_batch_size=2, val_interval=6, val_steps=2, log_interval=4, final_eval=True,
                           debug=False, save=True, hard_negatives=False)
    results = run_world_trainer(hp, scratch, train_size=16, val_records=4)
    for key in ("edit/acc_val", "loss/loc_val", "loss/total_edit_val", "mu_count_val"):
        assert key in results and math.isfinite(results[key]), f"results.json lacks a finite {key}: {results}"
    checkpoint = scratch / "results" / "models" / "LDKE" / model_dir.name
    assert checkpoint.is_file()
    model, tok = world.load()
    edit_hp = load_hparams(METHOD, "world", classifier_archive=str(checkpoint))
    rec = world.records("edit")[0]
    edited, handle = apply_ldke_to_multimodal_model(model, tok, rec, edit_hp, return_orig_weights=True)
    assert handle.stats.flat()["fit_success"], handle.stats.flat()
    handle()


def test_multimodal_editor_edit_dataset_rewrite_rises(ldke_installed: Any, scratch: Path) -> None:
    """alg_name LDKE in EasyEdit's MultimodalEditor: post rewrite_acc rises above pre on world edits."""
    from mke_plugins.methods.ldke.edit import clear

    editor = world_editor(METHOD)
    check_metrics(edit_dataset(editor, 3))
    assert clear(editor.model) == 3  # edit_dataset() never restores: the three edits are still there


def test_multimodal_editor_restores_and_edits_sequentially(ldke_installed: Any, scratch: Path) -> None:
    """A single edit() leaves the model bit-identical; sequential_edit=True gives one entry per request."""
    from mke_plugins import world
    from mke_plugins.methods.ldke.edit import clear

    editor = world_editor(METHOD)
    inputs = world_inputs(world.record_paths("edit")[:2])
    before, metrics = single_edit_restores(editor, inputs)
    assert value(metrics[0]["post"]["rewrite_acc"]) == 1.0
    metrics, _, _ = editor.edit(**inputs, sequential_edit=True, verbose=False)
    assert [m["case_nums"] for m in metrics] == [0, 1]
    for m in metrics:
        assert value(m["post"]["rewrite_acc"]) > value(m["pre"]["rewrite_acc"])
    assert clear(editor.model) == 2
    assert_restored(editor, before, "clear()")
