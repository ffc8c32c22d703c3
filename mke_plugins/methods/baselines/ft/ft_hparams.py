"""Hyperparameters of the FT baseline (one FFN value matrix, Adam, early stop at success)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp


@dataclass
class FTHyperParams(MultimodalHyperParams):
    """FT: Adam on the value matrix (``down_proj`` / ``fc2``) of one decoder layer."""

    ALG_NAME: ClassVar[str] = "FT"

    alg_name: str = hp("FT", "Must be exactly 'FT' (the bench's baseline; EasyEdit's own text FT is a different method).")
    layer: int = hp(-1, "Decoder layer whose FFN value matrix is trained: 0-based index into the language "
                        "model's layers; negative counts from the end (-1 = last).")
    lr: float = hp(1e-2, "Adam learning rate.")
    max_steps: int = hp(50, "Step cap per request; training stops earlier once every target token is the argmax.")
    weight_decay: float = hp(0.0, "Adam weight decay (L2 on the trained matrix).")
    norm_constraint: float = hp(0.0, "If > 0, every entry of the matrix stays within +-this of its value "
                                     "before the edit (EasyEdit FT's norm_constraint); 0 = no constraint.")
    append_eos: bool = hp(False, "Also train the family's end-of-answer token after the target. False "
                                 "trains exactly the tokens EasyEdit's evaluator scores.")

    def validate(self, *, path: str = "<dict>") -> None:
        if self.lr <= 0:
            raise HparamsError(f"lr must be positive, got {self.lr}.", path=path, key="lr", fix="use e.g. 1e-2.")
        if self.max_steps < 0:
            raise HparamsError(f"max_steps must be >= 0, got {self.max_steps}.", path=path, key="max_steps",
                               fix="use a step cap such as 50.")
        if self.norm_constraint < 0 or self.weight_decay < 0:
            key = "norm_constraint" if self.norm_constraint < 0 else "weight_decay"
            raise HparamsError(f"{key} must be >= 0.", path=path, key=key, fix="use 0 to switch it off.")
