"""Hyperparameters of the LoRA baseline (peft ``lora`` on one decoder layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp


@dataclass
class LoRAHyperParams(MultimodalHyperParams):
    """LoRA: peft adapters on modules of the chosen decoder layers, trained with Adam."""

    ALG_NAME: ClassVar[str] = "LoRA"

    alg_name: str = hp("LoRA", "Must be exactly 'LoRA' (the bench's baseline; EasyEdit's own multimodal LoRA "
                               "keeps its name there).")
    lora_type: str = hp("lora", "Only 'lora' (plain LoRA). EasyEdit's 'adalora' fails with current peft "
                                "(needs total_step) and is refused.")
    layers: list[int] = hp([-1], "Decoder layers (0-based; negative counts from the end) whose modules get "
                                 "adapters.")
    target_modules: list[str] = hp(["q_proj", "v_proj"], "Module-name suffixes inside each chosen layer that "
                                                         "get an adapter (peft suffix matching); each must "
                                                         "name an nn.Linear.")
    rank: int = hp(8, "LoRA rank r.")
    lora_alpha: float = hp(32.0, "LoRA scaling numerator (the update is scaled by lora_alpha / rank).")
    lora_dropout: float = hp(0.0, "Dropout on the adapter input during training (0 keeps edits deterministic).")
    lr: float = hp(1e-2, "Adam learning rate of the adapter weights.")
    max_steps: int = hp(50, "Step cap per request; training stops earlier once every target token is the argmax.")
    weight_decay: float = hp(0.0, "Adam weight decay on the adapter weights.")
    append_eos: bool = hp(False, "Also train the family's end-of-answer token after the target. False "
                                 "trains exactly the tokens EasyEdit's evaluator scores.")

    def validate(self, *, path: str = "<dict>") -> None:
        if self.lora_type != "lora":
            raise HparamsError(f"lora_type {self.lora_type!r} is not supported.", path=path, key="lora_type",
                               fix="use lora_type: lora (adalora needs a training schedule an edit does not have).")
        if not self.layers:
            raise HparamsError("layers is empty.", path=path, key="layers", fix="name at least one layer, e.g. [2].")
        if not self.target_modules:
            raise HparamsError("target_modules is empty.", path=path, key="target_modules",
                               fix="list module-name suffixes such as [q_proj, v_proj].")
        bad = [t for t in self.target_modules if "*" in t or t.startswith("model.")]
        if bad:
            raise HparamsError(f"target_modules {bad} look like full paths or wildcards.", path=path,
                               key="target_modules", fix="give suffixes only (q_proj, v_proj, down_proj); the "
                                                         "layers come from `layers`.")
        if self.rank < 1:
            raise HparamsError(f"rank must be >= 1, got {self.rank}.", path=path, key="rank", fix="use e.g. 8.")
        if self.lr <= 0 or self.max_steps < 0 or not 0 <= self.lora_dropout < 1:
            key = "lr" if self.lr <= 0 else ("max_steps" if self.max_steps < 0 else "lora_dropout")
            raise HparamsError(f"{key} is out of range.", path=path, key=key,
                               fix="lr > 0, max_steps >= 0, 0 <= lora_dropout < 1.")
