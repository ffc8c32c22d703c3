"""The fields EasyEdit's ``MultimodalTrainer`` reads off a training hparams object, declared once.

A method with an offline stage (LDKE's classifier, UniKE's encoders) trains through EasyEdit's own
trainer, so its training hparams class must carry every field ``BaseTrainer`` and
``MultimodalTrainer`` read (EASYEDIT.md §6), most of which the method itself never uses. They are
declared here, with EasyEdit's usual values, so each method class lists only what it means
differently (its ``alg``, its losses' weights, its schedule) and the contract stays in one place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from mke_plugins.hparams import hp


@dataclass
class EasyEditTrainerFields:
    """EasyEdit trainer fields (mixin: put it before ``MultimodalHyperParams`` in the bases)."""

    alg: str = hp("", "EasyEdit's trainer key: ALG_TRAIN_DICT[alg.upper()]; must name this method.")
    inner_params: list[str] = hp([], "EasyEdit's get_model checks these dotted parameter names exist in the model.")
    archive: str | None = hp(None, "EasyEdit: a trainer checkpoint to resume from.")
    lr_lr: float = hp(1e-4, "EasyEdit: learning rate of the method's edit_lrs (none unless its README says so).")
    edit_lr: float = hp(1e-4, "EasyEdit trainer field (unused unless the method's README says so).")
    opt: str = hp("Adam", "EasyEdit: torch.optim class name of the outer optimiser.")
    cedit: float = hp(1.0, "EasyEdit: weight of the edit loss on edit_outer.")
    iedit: float = hp(0.0, "EasyEdit: weight of the image edit loss on edit_outer_image.")
    cloc: float = hp(0.0, "EasyEdit: weight of the locality losses on loc and loc_image.")
    cbase: float = hp(0.0, "EasyEdit: weight of the base loss.")
    dropout: float | None = hp(None, "EasyEdit: dropout reset on the base model (null keeps the model's).")
    no_grad_layers: Any = hp(None, "EasyEdit trainer field (keep null).")
    half: bool = hp(False, "EasyEdit trainer field (keep false).")
    train_base: bool = hp(False, "EasyEdit: also train the base model; keep false (the model stays frozen).")
    model_parallel: bool = hp(False, "EasyEdit trainer field (keep false).")
    freeze_qformer: bool = hp(True, "EasyEdit: LAVIS families' Q-Former stays frozen.")
    val_batch_size: int = hp(1, "EasyEdit: validation batch size.")
    accumulate_bs: int = hp(1, "EasyEdit: gradient accumulation steps.")
    grad_clip: float = hp(100.0, "EasyEdit: gradient-norm clip of the outer parameters.")
    max_epochs: int | None = hp(None, "EasyEdit: epochs over the train set.")
    max_iters: int | None = hp(None, "EasyEdit: iteration cap.")
    log_interval: int = hp(100, "EasyEdit: steps between training logs.")
    val_interval: int = hp(500, "EasyEdit: steps between validations (each may save a checkpoint).")
    val_steps: int = hp(200, "EasyEdit: validation batches per validation.")
    early_stop_patience: int = hp(20000, "EasyEdit: early-stopping patience in steps.")
    early_stop_key: str = hp("loss/total_edit_val", "EasyEdit: the validation key early stopping watches.")
    eval_only: bool = hp(False, "EasyEdit trainer field (keep false).")
    final_eval: bool = hp(True, "EasyEdit: validate once more after training and write results.json.")
    debug: bool = hp(False, "EasyEdit: debug mode (with save false, no checkpoint per validation).")
    save: bool = hp(True, "EasyEdit: write trainer checkpoints.")
    silent: bool = hp(False, "EasyEdit: fewer logs.")
    results_dir: str = hp("./results", "EasyEdit: output root (results.json, models/<alg>/<model>).")
