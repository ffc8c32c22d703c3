"""DECODE's hyperparameters (README, "Hyperparameters"): a typed dataclass loaded from YAML.

The defaults are the reference (7B-class) values; ``hparams/world.yaml`` holds the values for
the bundled tiny world model. Every field carries a ``help`` text and its constraints
(``hp(..., ge=...)``, ``Literal`` choices), which the base checks; errors name the field and
what is allowed.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mke_plugins.core.augment import copies_hp, noise_hp
from mke_plugins.hparams import MultimodalHyperParams, hp


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
              "last `num_last_layers_excluded`.", ge=0, nonempty=True, distinct=True)
    num_last_layers_excluded: int = hp(
        3, "Final decoder layers never scored or edited when `layers` is null (reference: 3 of 32).", ge=0)
    topk_per_token: int = hp(
        40, "Neurons kept per answer token, ranked over all analysed layers together (reference: 40).", ge=1)
    max_neurons_per_group: int = hp(
        40, "Cap on each neuron group after the union over answer tokens (reference: 40).", ge=1)
    truncate_by: Literal["score", "index"] = hp(
        "score", "How the group cap truncates the union: 'score' keeps the highest scores (project "
                 "choice), 'index' the lowest (layer, index) (reference order).")
    group_mode: Literal["overlap", "disjoint"] = hp(
        "overlap", "'overlap': a neuron found by both triggers is edited in both stages (reference); "
                   "'disjoint': shared neurons go to the text stage only (ablation).")
    stage_order: Literal["text_first", "image_first", "joint"] = hp(
        "text_first", "'text_first' (default), 'image_first', or 'joint' (one stage on the paired "
                      "input over both groups; reference ablation).")
    lr: float = hp(2e-3, "Adam learning rate of the value-column offsets (reference: 2e-3).", gt=0)
    max_steps: int = hp(200, "Optimisation step cap per stage (reference: 200).", ge=0)
    prefix_replay: bool = hp(
        True, "Speed only: each stage re-runs only the decoder layers from its lowest edited one up, from the state "
              "the full forward gave it (core.replay); the logits are the same. false runs the full model every "
              "step.")
    kl_weight: float = hp(0.6, "Weight of the KL term on prompt positions (reference: 0.6).", ge=0)
    kl_on_image_tokens: bool = hp(
        True, "Include image-token positions in the KL term (reference: true); false saves memory on "
              "long image-token runs.")
    early_stop_text: float = hp(0.3, "End the text stage when the mean target CE is below this "
                                "(reference: 0.3).", ge=0)
    early_stop_image: float = hp(0.7, "End the image stage when the mean target CE is below this "
                                 "(reference: 0.7).", ge=0)
    early_stop_joint: float = hp(0.5, "End the joint stage when the mean target CE is below this "
                                 "(reference: 0.5).", ge=0)
    early_stop_on: Literal["answer_eos", "answer"] = hp(
        "answer_eos", "Which tokens' mean CE the early-stop thresholds compare: 'answer_eos' (reference: the "
                      "answer tokens and the end-of-answer token the stage trains on) or 'answer' (the answer "
                      "tokens only; the loss still trains on the end-of-answer token). 'answer' lets a stage stop "
                      "on a model that never learnt to end its answers (README, 'Measurements').")
    append_eos: bool = hp(
        True, "Train on target + the family's end-of-answer token (reference: true); ignored for "
              "families without one.")
    fit_copies: int = copies_hp("each stage's input", " An extension of the paper (README, 'Sequential editing: "
                                                      "the lifelong mode').")
    fit_noise: float = noise_hp()
    route_threshold: float | None = hp(
        None, "Lifelong mode: keep each edit's offsets apart instead of folding them, and apply an edit to an input "
              "(every position) only when some position of it has a cosine above this to one of the edit's own "
              "queries at the routing layer (core.routing; README, 'Sequential editing'). null (default): fold, "
              "the paper's editor. Recommended for sequential editing on the bundled lifelong model: 0.9 with "
              "route_exclusive: true and route_window: 2.", ge=-1, lt=1)
    route_layer: int = hp(
        -1, "Lifelong mode: the decoder layer whose FFN input routes the edits (negative counts from the top).")
    route_window: int = hp(
        1, "Lifelong mode: routing compares each position's state averaged with the states of the route_window - 1 "
           "positions before it (keys and inputs alike), not the position alone. 2 keeps more rephrased questions "
           "on their edit at the same threshold (README, 'Sequential editing'); 1 (default): one position.", ge=1)
    route_exclusive: bool = hp(
        False, "Lifelong mode, with route_threshold: an input gets only its closest admitted edit (the largest "
               "cosine over its positions), not every edit whose threshold it passes.")
    seed: int = hp(42, "Seed for every nondeterministic step (torch RNG is seeded per edit).", ge=0)

