"""Hyperparameters of the FT baseline (one FFN value matrix, Adam, early stop at success)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mke_plugins.hparams import MultimodalHyperParams, hp


@dataclass
class FTHyperParams(MultimodalHyperParams):
    """FT: Adam on the value matrix (``down_proj`` / ``fc2``) of one decoder layer."""

    ALG_NAME: ClassVar[str] = "FT"

    alg_name: str = hp("FT", "Must be exactly 'FT' (the bench's baseline; "
                             "EasyEdit's own text FT is a different method).")
    layer: int = hp(-1, "Decoder layer whose FFN value matrix is trained: 0-based index into the language "
                        "model's layers; negative counts from the end (-1 = last).")
    lr: float = hp(1e-2, "Adam learning rate.", gt=0)
    max_steps: int = hp(50, "Step cap per request; training stops earlier once every target token is the argmax.",
                        ge=0)
    weight_decay: float = hp(0.0, "Adam weight decay (L2 on the trained matrix).", ge=0)
    norm_constraint: float = hp(0.0, "If > 0, every entry of the matrix stays within +-this of its value "
                                     "before the edit (EasyEdit FT's norm_constraint); 0 = no constraint.", ge=0)
    append_eos: bool = hp(False, "Also train the family's end-of-answer token after the target. False "
                                 "trains exactly the tokens EasyEdit's evaluator scores.")

