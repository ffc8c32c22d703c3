"""DECODE's hyperparameters (spec §4): a typed, validated dataclass loaded from YAML.

The defaults are the reference (7B-class) values; ``hparams/world.yaml`` holds the values for
the bundled tiny world model. Every field carries a ``help`` text, and every validation error
names the field and lists what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp

TRUNCATE_BY = ("score", "index")
GROUP_MODES = ("overlap", "disjoint")
STAGE_ORDERS = ("text_first", "image_first", "joint")


@dataclass
class DECODEHyperParams(MultimodalHyperParams):
    """Hyperparameters of DECODE (modality-specific neuron editing)."""

    ALG_NAME: ClassVar[str] = "DECODE"
    ALG_REFUSED: ClassVar[dict[str, str]] = {
        "DeCo": "alg_name 'DeCo' is EasyEdit's own, unrelated method, not DECODE.",
        "Decode": "alg_name is case-sensitive: 'Decode' is not 'DECODE'.",
        "decode": "alg_name is case-sensitive: 'decode' is not 'DECODE'.",
    }

    alg_name: str = hp("DECODE", "Must be exactly 'DECODE' (EasyEdit's unrelated 'DeCo' is refused).")
    layers: list[int] | None = hp(
        None, "Explicit decoder layers to score and edit (0-based); null = every layer except the "
              "last `num_last_layers_excluded`.")
    num_last_layers_excluded: int = hp(
        3, "Final decoder layers never scored or edited when `layers` is null (reference: 3 of 32).")
    topk_per_token: int = hp(
        40, "Neurons kept per answer token, ranked over all analysed layers together (reference: 40).")
    max_neurons_per_group: int = hp(
        40, "Cap on each neuron group after the union over answer tokens (reference: 40).")
    truncate_by: str = hp(
        "score", "How the group cap truncates the union: 'score' keeps the highest scores (project "
                 "choice), 'index' the lowest (layer, index) (reference order).")
    group_mode: str = hp(
        "overlap", "'overlap': a neuron found by both triggers is edited in both stages (reference); "
                   "'disjoint': shared neurons go to the text stage only (ablation).")
    stage_order: str = hp(
        "text_first", "'text_first' (default), 'image_first', or 'joint' (one stage on the paired "
                      "input over both groups; reference ablation).")
    lr: float = hp(2e-3, "Adam learning rate of the value-column offsets (reference: 2e-3).")
    max_steps: int = hp(200, "Optimisation step cap per stage (reference: 200).")
    kl_weight: float = hp(0.6, "Weight of the KL term on prompt positions (reference: 0.6).")
    kl_on_image_tokens: bool = hp(
        True, "Include image-token positions in the KL term (reference: true); false saves memory on "
              "long image-token runs.")
    early_stop_text: float = hp(0.3, "End the text stage when the mean target CE is below this (reference: 0.3).")
    early_stop_image: float = hp(0.7, "End the image stage when the mean target CE is below this (reference: 0.7).")
    early_stop_joint: float = hp(0.5, "End the joint stage when the mean target CE is below this (reference: 0.5).")
    append_eos: bool = hp(
        True, "Train on target + the family's end-of-answer token (reference: true); ignored for "
              "families without one.")
    seed: int = hp(42, "Seed for every nondeterministic step (torch RNG is seeded per edit).")

    def validate(self, *, path: str = "<dict>") -> None:
        """Reject values that cannot work; errors name the field and the valid values."""
        self.check_choice("truncate_by", TRUNCATE_BY, path=path)
        self.check_choice("group_mode", GROUP_MODES, path=path)
        self.check_choice("stage_order", STAGE_ORDERS, path=path)
        for key in ("topk_per_token", "max_neurons_per_group"):
            _positive_int(self, key, path)
        for key in ("num_last_layers_excluded", "max_steps", "seed"):
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise HparamsError(f"expected a whole number >= 0, got {value!r}.", path=path, key=key,
                                   fix="write 0 or a positive integer.")
        if not isinstance(self.lr, (int, float)) or not self.lr > 0:
            raise HparamsError(f"expected a number > 0, got {self.lr!r}.", path=path, key="lr",
                               fix="write a positive learning rate such as 1e-2.")
        for key in ("kl_weight", "early_stop_text", "early_stop_image", "early_stop_joint"):
            value = getattr(self, key)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
                raise HparamsError(f"expected a number >= 0, got {value!r}.", path=path, key=key,
                                   fix="write a non-negative number.")
        if self.layers is not None:
            bad = [v for v in self.layers if not isinstance(v, int) or isinstance(v, bool) or v < 0]
            if bad or not self.layers or len(set(self.layers)) != len(self.layers):
                raise HparamsError(f"expected a non-empty list of distinct layer indices >= 0, got "
                                   f"{self.layers!r}.", path=path, key="layers",
                                   fix="write e.g. [0, 1, 2], or null for all but the last "
                                       "`num_last_layers_excluded` layers.")


def _positive_int(h: DECODEHyperParams, key: str, path: str) -> None:
    value = getattr(h, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HparamsError(f"expected a whole number >= 1, got {value!r}.", path=path, key=key,
                           fix="write a positive integer.")
