"""Hyperparameters of HelloFT: every field documented, its constraints declared (the base checks them)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mke_plugins.author import MultimodalHyperParams, hp


@dataclass
class HelloFTHyperParams(MultimodalHyperParams):
    ALG_NAME: ClassVar[str] = "HelloFT"

    layer: int = hp(1, "Decoder layer whose MLP value matrix is fine-tuned (negative counts from the top).")
    lr: float = hp(5e-3, "Adam learning rate.", gt=0)
    max_steps: int = hp(40, "Step cap; training stops earlier once every target token is argmax-correct.",
                        ge=1)

