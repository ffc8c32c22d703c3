"""Hyperparameters of HelloFT (every field documented, strict loading from the base)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mke_plugins.hparams import MultimodalHyperParams, hp


@dataclass
class HelloFTHyperParams(MultimodalHyperParams):
    ALG_NAME: ClassVar[str] = "HelloFT"

    layer: int = hp(1, "Decoder layer whose MLP value matrix is fine-tuned (negative counts from the top).")
    lr: float = hp(5e-3, "Adam learning rate.")
    max_steps: int = hp(40, "Step cap; training stops earlier once every target token is argmax-correct.")

    def validate(self, *, path: str = "<dict>") -> None:
        from mke_hooks import HparamsError

        if self.max_steps < 1:
            raise HparamsError("must be at least 1.", path=path, key="max_steps", fix="set max_steps: 10")
        if self.lr <= 0:
            raise HparamsError("must be positive.", path=path, key="lr", fix="set lr: 5e-3")
