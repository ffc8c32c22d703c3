"""Hyperparameters of the LoRA baseline (peft ``lora`` on one decoder layer)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp


@dataclass
class LoRAHyperParams(MultimodalHyperParams):
    """LoRA: peft adapters on modules of the chosen decoder layers, trained with Adam."""

    ALG_NAME: ClassVar[str] = "LoRA"

    alg_name: str = hp("LoRA", "Must be exactly 'LoRA' (the bench's baseline; EasyEdit's own multimodal LoRA "
                               "keeps its name there).")
    lora_type: Literal["lora"] = hp("lora", "Only 'lora' (plain LoRA). EasyEdit's 'adalora' fails with current "
                                            "peft (needs total_step) and is refused.")
    layers: list[int] = hp([-1], "Decoder layers (0-based; negative counts from the end) whose modules get "
                                 "adapters.", nonempty=True)
    target_modules: list[str] = hp(["q_proj", "v_proj"], "Module-name suffixes inside each chosen layer that "
                                                         "get an adapter (peft suffix matching); each must "
                                                         "name an nn.Linear.", nonempty=True)
    rank: int = hp(8, "LoRA rank r.", ge=1)
    lora_alpha: float = hp(32.0, "LoRA scaling numerator (the update is scaled by lora_alpha / rank).")
    lora_dropout: float = hp(0.0, "Dropout on the adapter input during training (0 keeps edits deterministic).",
                                 ge=0, lt=1)
    lr: float = hp(1e-2, "Adam learning rate of the adapter weights.", gt=0)
    max_steps: int = hp(50, "Step cap per request; training stops earlier once every target token is the argmax.",
                        ge=0)
    weight_decay: float = hp(0.0, "Adam weight decay on the adapter weights.", ge=0)
    append_eos: bool = hp(False, "Also train the family's end-of-answer token after the target. False "
                                 "trains exactly the tokens EasyEdit's evaluator scores.")

    def validate(self, *, path: str = "<dict>") -> None:
        """``target_modules`` holds suffixes: the layers come from ``layers``."""
        super().validate(path=path)
        bad = [t for t in self.target_modules if "*" in t or t.startswith("model.")]
        if bad:
            raise HparamsError(f"target_modules {bad} look like full paths or wildcards.", path=path,
                               key="target_modules", fix="give suffixes only (q_proj, v_proj, down_proj); the "
                                                         "layers come from `layers`.")
