"""LDKE's hyperparameters (README, "Hyperparameters"): the editing class and the classifier-training class.

``LDKEHyperParams`` is what EasyEdit's ``MultimodalEditor`` (and the bench) pass to ``apply``;
``LDKETrainingHyperParams`` is what ``MultimodalTrainer`` and ``mke-plugins train LDKE`` read: EasyEdit's
trainer fields plus the Disentanglement Classifier's fields and ``alg: LDKE``. The fields both
need (feature and head shape, the layer-prior settings) live in one mixin so that the two classes
cannot drift apart. Defaults are the 7B-class values; ``hparams/world.yaml`` holds the world ones.
Each field declares its constraints (``hp(..., ge=...)``, ``Literal`` choices); ``validate`` holds
the rules across fields.

``classifier_archive`` accepts ``@ldke/<file>`` for an archive bundled with this package
(``@ldke/world.pt`` is the world model's); it is resolved to an absolute path on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mke_hooks import HparamsError
from mke_plugins.core.augment import copies_hp, noise_hp
from mke_plugins.hparams import MultimodalHyperParams, hp
from mke_plugins.trainer_hparams import EasyEditTrainerFields

REFUSED = {
    "ldke": "alg_name is case-sensitive: 'ldke' is not 'LDKE'.",
    "Ldke": "alg_name is case-sensitive: 'Ldke' is not 'LDKE'.",
}


@dataclass
class _RouterFields:
    """Fields shared by editing and training: the archive's shape and the layer baseline."""

    features: Literal["hidden", "clip"] = hp(
        "hidden", "Router features: 'hidden' (the model's own layer-f states, no downloaded weights) or 'clip' "
                  "(a local CLIP checkpoint, see clip_model).")
    feature_layer: int | None = hp(None, "Decoder layer f whose residual output gives the features; null = L // 2.",
                                   ge=0)
    clip_model: str | None = hp(None, "Local CLIP checkpoint directory for features: clip (never downloaded).")
    head: Literal["pair", "distance"] = hp(
        "pair", "Classifier head: 'pair' (MLP over [u; w; |u-w|; u*w]) or 'distance' (sigmoid(b - a*||u-w||^2), "
                "ablation).")
    proj_dim: int = hp(256, "Projection width p of the head (u = P phi(x)).", ge=1)
    head_hidden: int = hp(256, "Hidden width h of the pair head's MLP.", ge=1)
    score_modules: Literal["value", "mlp"] = hp(
        "value", "What the gradient layer score covers: 'value' (the MLP value matrix W_l) or 'mlp' (the key "
                 "matrices too).")
    prior_edits: int = hp(200, "Training-split edits averaged into the per-model layer baseline mu.", ge=0)


@dataclass
class LDKEHyperParams(_RouterFields, MultimodalHyperParams):
    """Hyperparameters of an LDKE edit (Fast Localization, side deltas, routing)."""

    ALG_NAME: ClassVar[str] = "LDKE"
    ALG_REFUSED: ClassVar[dict[str, str]] = REFUSED

    alg_name: str = hp("LDKE", "Must be exactly 'LDKE'.")
    localization: Literal["grad", "trace", "full_trace", "fixed"] = hp(
        "grad", "Layer scorer: 'grad' (Fast Localization), 'trace' (cheap causal trace), 'full_trace' (ROME-style "
                "trace, reference) or 'fixed' (ablation).")
    top_k: int = hp(2, "Number k of critical layers edited per fact.", ge=1)
    fixed_layers: list[int] | None = hp(None, "Layers for localization: fixed; null = the static top-k of mu.",
                                        ge=0, nonempty=True, distinct=True)
    layer_prior: Literal["archive", "none"] = hp(
        "archive", "Score normalisation: 'archive' (divide by the archive's baseline mu) or 'none' (divide by "
                   "||W_l||_F; needs no archive).")
    delta_rank: int = hp(8, "Rank r of each side delta B_l A_l.", ge=1)
    edit_lr: float = hp(1e-3, "Adam learning rate of the side-delta factors.", gt=0)
    edit_steps: int = hp(30, "Maximum optimisation steps per edit.", ge=1)
    stop_nll: float = hp(0.05, "Stop once every target token is argmax-correct and the NLL is below this.",
                         ge=0)
    weight_norm: float = hp(1e-3, "lambda_norm on ||B_l A_l||_F^2.", ge=0)
    fit_noise: float = noise_hp()
    fit_copies: int = copies_hp("the edit input", " Robustness of the fit (project choice).")
    prefix_replay: bool = hp(
        True, "Speed only: without fit noise, the fit re-runs only the decoder layers from the lowest localized one "
              "up, from the state the full forward gave it (core.replay); the logits are the same. false runs the "
              "full model every step.")
    loc_kl_weight: float = hp(0.0, "Optional edit-time locality KL weight (0 = off; the router carries locality).",
                              ge=0)
    loc_kl_samples: int = hp(8, "Training-split prompts (stored in the archive) used by the locality KL.",
                             ge=0)
    router: bool = hp(True, "Route each input to the edited or the original weights (false = always edited, "
                            "ablation).")
    classifier_archive: str | None = hp(None, "LDKE archive (head, tau, mu) built by `mke-plugins train LDKE`; "
                                               "'@ldke/world.pt' is the bundled world archive.")
    route_threshold: float | None = hp(None, "Routing threshold tau; null = the archive's calibrated value "
                                             "(0.5 if absent). A higher value keeps the head's false routes "
                                             "from compounding over many keys, at a cost in generality; long "
                                             "sequences: scope_threshold instead (README, 'Sequential').", ge=0, le=1)
    scope_threshold: float | None = hp(
        None, "Lifelong mode: an edit is routed only to inputs with some position whose state at the last decoder "
              "layer's FFN input has a cosine above this to one of the edit input's states there (its answer "
              "positions; core InputScope, as ASAM's and UniKE's scopes); the head then chooses among those edits. "
              "null (default): the classifier alone, as the paper. Recommended for long sequences on the lifelong "
              "world: 0.9 (README, 'Sequential').", ge=-1, lt=1)
    prefilter: int = hp(16, "Keys pre-selected by cosine similarity and scored by the head per input.", ge=1)
    supersede_threshold: float | None = hp(None, "A new edit supersedes an earlier one when its input is that "
                                                 "edit's own input (exact match), or, if set, routes to it with "
                                                 "at least this head score; null = exact re-edits only.",
                                        ge=0, le=1)
    exact_match_guard: bool = hp(True, "An input equal to an edit's own input (same prompt tokens, same image "
                                       "features) always routes to that edit.")
    trace_noise: float = hp(3.0, "Causal-trace noise: std multiple of the corrupted embeddings' std.", gt=0)
    trace_samples: int = hp(10, "Noise draws per restored state in full_trace.", ge=1)
    trace_batch: int = hp(16, "Rows per forward pass in full_trace.", ge=1)
    compare_localization: bool = hp(False, "Also run full_trace on each edit and report its time and top layer "
                                           "beside the chosen scorer's (stats only; the edit is unchanged).")
    seed: int = hp(0, "Seed of every random step (delta init, trace noise).", ge=0)

    def validate(self, *, path: str = "<dict>") -> None:
        """``features: clip`` needs ``clip_model``."""
        super().validate(path=path)
        _check_clip(self, path)

    def needs_archive(self) -> bool:
        """The archive is needed for routing, for mu, and for the static top-k of mu."""
        return (self.router or self.layer_prior == "archive"
                or (self.localization == "fixed" and self.fixed_layers is None)
                or self.loc_kl_weight > 0)


@dataclass
class LDKETrainingHyperParams(_RouterFields, EasyEditTrainerFields, MultimodalHyperParams):
    """Training the Disentanglement Classifier: EasyEdit trainer fields plus the router's.

    See the README, "The archive and its training".
    """

    ALG_NAME: ClassVar[str] = "LDKE"
    ALG_REFUSED: ClassVar[dict[str, str]] = REFUSED

    alg_name: str = hp("LDKE", "Must be exactly 'LDKE'.")
    alg: str = hp("LDKE", "EasyEdit's trainer key (ALG_TRAIN_DICT[alg.upper()]); must be 'LDKE'.")
    inner_params: list[str] = hp([], "EasyEdit checks these dotted parameter names exist; LDKE trains no model "
                                     "parameter, name any one (e.g. layer f's value matrix).")
    lr: float = hp(1e-4, "Learning rate of the classifier head (EasyEdit's outer optimiser).", gt=0)
    cedit: float = hp(1.0, "Weight of NLL(edit_outer): pulls positives' routing score up.", ge=0)
    iedit: float = hp(1.0, "Weight of NLL(edit_outer_image): pulls image positives' routing score up.", ge=0)
    cloc: float = hp(1.0, "Weight of KL(loc) + KL(loc_image): pushes negatives' routing score down.", ge=0)
    batch_size: int = hp(8, "Training records per step.", ge=1)
    val_batch_size: int = hp(8, "Validation records per step (EasyEdit's validate()).", ge=1)
    grad_clip: float = hp(1.0, "Gradient-norm clip of the head.", ge=0)
    max_epochs: int = hp(3, "Training epochs.", ge=1)
    max_iters: int | None = hp(None, "EasyEdit field; the front-end sets it per epoch.", ge=1)
    val_interval: int = hp(1000000, "EasyEdit: steps between EasyEdit's own validations (the front-end "
                                     "validates routing after each epoch itself).", ge=1)
    val_steps: int = hp(100, "EasyEdit: validation steps in debug mode.", ge=1)
    early_stop_patience: int = hp(1000000, "EasyEdit field.", ge=0)
    final_eval: bool = hp(False, "EasyEdit: evaluate and write results.json at the end of run().")
    debug: bool = hp(True, "EasyEdit: with save false, no checkpoint files are written per validation.")
    save: bool = hp(False, "EasyEdit: write trainer checkpoints.")
    silent: bool = hp(True, "EasyEdit: no per-step logging.")
    objective: Literal["trainer", "pairs"] = hp(
        "trainer", "How the head is trained: 'trainer' (EasyEdit's MultimodalTrainer loop: each input against its "
                   "own edit's key, tau per pair) or 'pairs' (every training input against every training key on "
                   "cached features, tau by routing over the validation memory; for sequential editing, README "
                   "'Lifelong mode'). The trainer fields below are read by 'trainer' only.")
    pair_steps: int = hp(1500, "objective: pairs: optimisation steps (validated 10 times, best head kept).", ge=1)
    pair_batch: int = hp(128, "objective: pairs: training inputs per step, each scored against every training key.",
                         ge=1)
    pair_positive_weight: float = hp(0.5, "objective: pairs: a positive pair weighs this times the number of "
                                          "training keys (an input has one own key and every other as negative).",
                                     gt=0)
    pair_weight_decay: float = hp(0.1, "objective: pairs: AdamW weight decay of the head.", ge=0)
    locality_negatives: bool = hp(True, "Use each training record's locality probes as negatives. false: the "
                                        "router never sees them (the lifelong archive's setting, chosen while "
                                        "those probes were the evaluation's locality pool).")
    neg_per_pos: int = hp(3, "Negatives sampled per positive.", ge=1)
    hard_negative_fraction: float = hp(0.5, "Share of the negatives that are hard (same image or same entity).",
                                       ge=0, le=1)
    hard_negatives: bool = hp(True, "Use hard negatives at all (false for MMEdit-style data, ablation).")
    val_fraction: float = hp(0.1, "Share of training-split records held out for validation (split by entity).",
                             gt=0, lt=1)
    trainer_boost: float = hp(10.0, "beta: the routed model adds s * beta to the logits of each row's own "
                                    "answer tokens, so EasyEdit's losses become a relevance loss on s.", gt=0)
    loc_prompts: int = hp(16, "Training-split text prompts stored in the archive for the optional edit-time "
                              "locality KL.", ge=0)
    seed: int = hp(0, "Seed of sampling, head initialisation and shuffling.", ge=0)

    def validate(self, *, path: str = "<dict>") -> None:
        """``alg`` names LDKE (``EasyEditTrainerFields``); ``features: clip`` needs ``clip_model``."""
        super().validate(path=path)
        _check_clip(self, path)


def _check_clip(obj: _RouterFields, path: str) -> None:
    """``features: clip`` needs ``clip_model``."""
    if obj.features == "clip" and not obj.clip_model:
        raise HparamsError("features: clip needs a local CLIP checkpoint.", path=path, key="clip_model",
                           fix="set clip_model to a local CLIP directory, or use features: hidden.")
