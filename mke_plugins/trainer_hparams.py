"""The fields EasyEdit's ``MultimodalTrainer`` reads off a training hparams object, declared once.

A method with an offline stage (LDKE's classifier, UniKE's encoders) trains through EasyEdit's own
trainer, so its training hparams class must carry every field ``BaseTrainer`` and
``MultimodalTrainer`` read (``hooks/EASYEDIT-NOTES.md``, "MultimodalTrainer and EditableModel"),
most of which the method itself never uses. They are declared here, with EasyEdit's usual values
and their constraints, so each method class lists only what it means differently (its ``alg``, its
losses' weights, its schedule) and the contract stays in one place. ``alg`` must name the method
(any case: EasyEdit upper-cases it) and ``train_base`` stays false: no method here trains the
model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from mke_hooks import HparamsError
from mke_plugins.hparams import hp


@dataclass
class EasyEditTrainerFields:
    """EasyEdit trainer fields (mixin: put it before ``MultimodalHyperParams`` in the bases)."""

    alg: str = hp("", "EasyEdit's trainer key: ALG_TRAIN_DICT[alg.upper()]; must name this method.")
    inner_params: list[str] = hp([], "EasyEdit's get_model checks these dotted parameter names exist in the model.")
    archive: str | None = hp(None, "EasyEdit: a trainer checkpoint to resume from.")
    lr_lr: float = hp(1e-4, "EasyEdit: learning rate of the method's edit_lrs (none unless its README says so).", gt=0)
    edit_lr: float = hp(1e-4, "EasyEdit trainer field (unused unless the method's README says so).", gt=0)
    opt: str = hp("Adam", "EasyEdit: torch.optim class name of the outer optimiser.")
    cedit: float = hp(1.0, "EasyEdit: weight of the edit loss on edit_outer.", ge=0)
    iedit: float = hp(0.0, "EasyEdit: weight of the image edit loss on edit_outer_image.", ge=0)
    cloc: float = hp(0.0, "EasyEdit: weight of the locality losses on loc and loc_image.", ge=0)
    cbase: float = hp(0.0, "EasyEdit: weight of the base loss.", ge=0)
    dropout: float | None = hp(None, "EasyEdit: dropout reset on the base model (null keeps the model's).",
                                 ge=0, lt=1)
    no_grad_layers: Any = hp(None, "EasyEdit trainer field (keep null).")
    half: bool = hp(False, "EasyEdit trainer field (keep false).")
    train_base: Literal[False] = hp(False, "EasyEdit: also train the base model; must stay false (the model stays "
                                           "frozen: the method trains only its own modules).")
    model_parallel: bool = hp(False, "EasyEdit: the model is spread over several GPUs; the trainer takes its device "
                                     "from the model and never moves it (`mke-plugins train --device-map` sets it).")
    freeze_qformer: bool = hp(True, "EasyEdit: LAVIS families' Q-Former stays frozen.")
    val_batch_size: int = hp(1, "EasyEdit: validation batch size.", ge=1)
    accumulate_bs: int = hp(1, "EasyEdit: gradient accumulation steps.", ge=1)
    grad_clip: float = hp(100.0, "EasyEdit: gradient-norm clip of the outer parameters.", ge=0)
    max_epochs: int | None = hp(None, "EasyEdit: epochs over the train set.", ge=1)
    max_iters: int | None = hp(None, "EasyEdit: iteration cap.", ge=1)
    log_interval: int = hp(100, "EasyEdit: steps between training logs.", ge=1)
    val_interval: int = hp(500, "EasyEdit: steps between validations (each may save a checkpoint).", ge=1)
    val_steps: int = hp(200, "EasyEdit: validation batches per validation.", ge=1)
    early_stop_patience: int = hp(20000, "EasyEdit: early-stopping patience in steps.", ge=0)
    early_stop_key: str = hp("loss/total_edit_val", "EasyEdit: the validation key early stopping watches.")
    eval_only: bool = hp(False, "EasyEdit trainer field (keep false).")
    final_eval: bool = hp(True, "EasyEdit: validate once more after training and write results.json.")
    debug: bool = hp(False, "EasyEdit: debug mode (with save false, no checkpoint per validation).")
    save: bool = hp(True, "EasyEdit: write trainer checkpoints.")
    silent: bool = hp(False, "EasyEdit: fewer logs.")
    results_dir: str = hp("./results", "EasyEdit: output root (results.json, models/<alg>/<model>).")

    def validate(self, *, path: str = "<dict>") -> None:
        """``alg`` names this method: EasyEdit's trainer looks it up as ``ALG_TRAIN_DICT[alg.upper()]``."""
        super().validate(path=path)  # type: ignore[misc]  # a mixin: the hparams base follows in the MRO
        if str(self.alg).upper() != self.ALG_NAME.upper():  # type: ignore[attr-defined]
            raise HparamsError(f"alg is {self.alg!r}; the trainer looks this method up by alg.", path=path,
                               key="alg", fix=f"set `alg: {self.ALG_NAME}`.")  # type: ignore[attr-defined]
