"""LDKE's hyperparameters (spec §3): the editing class and the classifier-training class.

``LDKEHyperParams`` is what EasyEdit's ``MultimodalEditor`` (and the bench) pass to ``apply``;
``LDKETrainingHyperParams`` is what ``MultimodalTrainer`` and ``mke-plugins train LDKE`` read: EasyEdit's
trainer fields plus the Disentanglement Classifier's fields and ``alg: LDKE``. The fields both
need (feature and head shape, the layer-prior settings) live in one mixin so that the two classes
cannot drift apart. Defaults are the 7B-class values; ``hparams/world.yaml`` holds the world ones.

``classifier_archive`` accepts ``@ldke/<file>`` for an archive bundled with this package
(``@ldke/world.pt`` is the world model's); it is resolved to an absolute path on load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp
from mke_plugins.trainer_hparams import EasyEditTrainerFields

LOCALIZATIONS = ("grad", "trace", "full_trace", "fixed")
SCORE_MODULES = ("value", "mlp")
LAYER_PRIORS = ("archive", "none")
FEATURES = ("hidden", "clip")
HEADS = ("pair", "distance")
BUNDLED_PREFIX = "@ldke/"
ARCHIVE_DIR = Path(__file__).resolve().parent / "archives"

REFUSED = {
    "ldke": "alg_name is case-sensitive: 'ldke' is not 'LDKE'.",
    "Ldke": "alg_name is case-sensitive: 'Ldke' is not 'LDKE'.",
}


def resolve_archive(value: Any) -> Any:
    """``@ldke/world.pt`` → the bundled file's absolute path; other values unchanged."""
    if isinstance(value, str) and value.startswith(BUNDLED_PREFIX):
        return str(ARCHIVE_DIR / value[len(BUNDLED_PREFIX):])
    return value


@dataclass
class _RouterFields:
    """Fields shared by editing and training: the archive's shape and the layer baseline."""

    features: str = hp("hidden", "Router features: 'hidden' (the model's own layer-f states, no downloaded "
                                 "weights) or 'clip' (a local CLIP checkpoint, see clip_model).")
    feature_layer: int | None = hp(None, "Decoder layer f whose residual output gives the features; null = L // 2.")
    clip_model: str | None = hp(None, "Local CLIP checkpoint directory for features: clip (never downloaded).")
    head: str = hp("pair", "Classifier head: 'pair' (MLP over [u; w; |u-w|; u*w]) or 'distance' "
                           "(sigmoid(b - a*||u-w||^2), ablation).")
    proj_dim: int = hp(256, "Projection width p of the head (u = P phi(x)).")
    head_hidden: int = hp(256, "Hidden width h of the pair head's MLP.")
    score_modules: str = hp("value", "What the gradient layer score covers: 'value' (the MLP value matrix W_l) "
                                     "or 'mlp' (the key matrices too).")
    prior_edits: int = hp(200, "Training-split edits averaged into the per-model layer baseline mu.")


@dataclass
class LDKEHyperParams(_RouterFields, MultimodalHyperParams):
    """Hyperparameters of an LDKE edit (Fast Localization, side deltas, routing)."""

    ALG_NAME: ClassVar[str] = "LDKE"
    ALG_REFUSED: ClassVar[dict[str, str]] = REFUSED

    alg_name: str = hp("LDKE", "Must be exactly 'LDKE'.")
    localization: str = hp("grad", "Layer scorer: 'grad' (Fast Localization), 'trace' (cheap causal trace), "
                                    "'full_trace' (ROME-style trace, reference) or 'fixed' (ablation).")
    top_k: int = hp(2, "Number k of critical layers edited per fact.")
    fixed_layers: list[int] | None = hp(None, "Layers for localization: fixed; null = the static top-k of mu.")
    layer_prior: str = hp("archive", "Score normalisation: 'archive' (divide by the archive's baseline mu) or "
                                     "'none' (divide by ||W_l||_F; needs no archive).")
    delta_rank: int = hp(8, "Rank r of each side delta B_l A_l.")
    edit_lr: float = hp(1e-3, "Adam learning rate of the side-delta factors.")
    edit_steps: int = hp(30, "Maximum optimisation steps per edit.")
    stop_nll: float = hp(0.05, "Stop once every target token is argmax-correct and the NLL is below this.")
    weight_norm: float = hp(1e-3, "lambda_norm on ||B_l A_l||_F^2.")
    fit_noise: float = hp(0.0, "Robustness of the fit: std (x the prompt embeddings' std) of Gaussian noise on the "
                               "prompt embeddings of the noisy copies (0 = fit on the clean edit input only).")
    fit_copies: int = hp(0, "Noisy copies of the edit input fitted beside the clean one (0 = none).")
    loc_kl_weight: float = hp(0.0, "Optional edit-time locality KL weight (0 = off; the router carries locality).")
    loc_kl_samples: int = hp(8, "Training-split prompts (stored in the archive) used by the locality KL.")
    router: bool = hp(True, "Route each input to the edited or the original weights (false = always edited, "
                            "ablation).")
    classifier_archive: str | None = hp(None, "LDKE archive (head, tau, mu) built by `mke-plugins train LDKE`; "
                                               "'@ldke/world.pt' is the bundled world archive.")
    route_threshold: float | None = hp(None, "Routing threshold tau; null = the archive's calibrated value "
                                             "(0.5 if absent).")
    prefilter: int = hp(16, "Keys pre-selected by cosine similarity and scored by the head per input.")
    supersede_threshold: float | None = hp(None, "A new edit supersedes an earlier one when its input is that "
                                                 "edit's own input (exact match), or, if set, routes to it with "
                                                 "at least this head score; null = exact re-edits only.")
    exact_match_guard: bool = hp(True, "An input equal to an edit's own input (same prompt tokens, same image "
                                       "features) always routes to that edit.")
    trace_noise: float = hp(3.0, "Causal-trace noise: std multiple of the corrupted embeddings' std.")
    trace_samples: int = hp(10, "Noise draws per restored state in full_trace.")
    trace_batch: int = hp(16, "Rows per forward pass in full_trace.")
    compare_localization: bool = hp(False, "Also run full_trace on each edit and report its time and top layer "
                                           "beside the chosen scorer's (stats only; the edit is unchanged).")
    seed: int = hp(0, "Seed of every random step (delta init, trace noise).")

    def validate(self, *, path: str = "<dict>") -> None:
        """Reject values that cannot work; each error names the field and the fix."""
        self.check_choice("localization", LOCALIZATIONS, path=path)
        self.check_choice("score_modules", SCORE_MODULES, path=path)
        self.check_choice("layer_prior", LAYER_PRIORS, path=path)
        self.check_choice("features", FEATURES, path=path)
        self.check_choice("head", HEADS, path=path)
        for key in ("top_k", "delta_rank", "edit_steps", "prefilter", "trace_samples", "trace_batch",
                    "proj_dim", "head_hidden"):
            _positive_int(self, key, path)
        for key in ("loc_kl_samples", "prior_edits", "seed", "fit_copies"):
            _non_negative_int(self, key, path)
        for key in ("edit_lr", "trace_noise"):
            _positive_number(self, key, path)
        for key in ("stop_nll", "weight_norm", "loc_kl_weight", "fit_noise"):
            _non_negative_number(self, key, path)
        if self.route_threshold is not None and not 0.0 <= float(self.route_threshold) <= 1.0:
            raise HparamsError(f"expected a number in [0, 1] or null, got {self.route_threshold!r}.", path=path,
                               key="route_threshold", fix="write e.g. 0.5, or null for the archive's value.")
        if self.supersede_threshold is not None and not 0.0 <= float(self.supersede_threshold) <= 1.0:
            raise HparamsError(f"expected a number in [0, 1] or null, got {self.supersede_threshold!r}.", path=path,
                               key="supersede_threshold", fix="write e.g. 0.95, or null for exact re-edits only.")
        if self.feature_layer is not None:
            _non_negative_int(self, "feature_layer", path)
        if self.fixed_layers is not None:
            layers = list(self.fixed_layers)
            if not layers or len(set(layers)) != len(layers) or any(int(i) < 0 for i in layers):
                raise HparamsError(f"expected distinct layer indices >= 0, got {self.fixed_layers!r}.", path=path,
                                   key="fixed_layers", fix="write e.g. [1, 2], or null for the static top-k of mu.")
        if self.features == "clip" and not self.clip_model:
            raise HparamsError("features: clip needs a local CLIP checkpoint.", path=path, key="clip_model",
                               fix="set clip_model to a local CLIP directory, or use features: hidden.")
        self.classifier_archive = resolve_archive(self.classifier_archive)

    def needs_archive(self) -> bool:
        """The archive is needed for routing, for mu, and for the static top-k of mu."""
        return (self.router or self.layer_prior == "archive"
                or (self.localization == "fixed" and self.fixed_layers is None)
                or self.loc_kl_weight > 0)


@dataclass
class LDKETrainingHyperParams(_RouterFields, EasyEditTrainerFields, MultimodalHyperParams):
    """Training the Disentanglement Classifier: EasyEdit trainer fields plus the router's (spec §4)."""

    ALG_NAME: ClassVar[str] = "LDKE"
    ALG_REFUSED: ClassVar[dict[str, str]] = REFUSED

    alg_name: str = hp("LDKE", "Must be exactly 'LDKE'.")
    alg: str = hp("LDKE", "EasyEdit's trainer key (ALG_TRAIN_DICT[alg.upper()]); must be 'LDKE'.")
    inner_params: list[str] = hp([], "EasyEdit checks these dotted parameter names exist; LDKE trains no model "
                                     "parameter, name any one (e.g. layer f's value matrix).")
    lr: float = hp(1e-4, "Learning rate of the classifier head (EasyEdit's outer optimiser).")
    cedit: float = hp(1.0, "Weight of NLL(edit_outer): pulls positives' routing score up.")
    iedit: float = hp(1.0, "Weight of NLL(edit_outer_image): pulls image positives' routing score up.")
    cloc: float = hp(1.0, "Weight of KL(loc) + KL(loc_image): pushes negatives' routing score down.")
    batch_size: int = hp(8, "Training records per step.")
    val_batch_size: int = hp(8, "Validation records per step (EasyEdit's validate()).")
    grad_clip: float = hp(1.0, "Gradient-norm clip of the head.")
    max_epochs: int | None = hp(3, "Training epochs.")
    max_iters: int | None = hp(None, "EasyEdit field; the front-end sets it per epoch.")
    val_interval: int = hp(1000000, "EasyEdit: steps between EasyEdit's own validations (the front-end "
                                     "validates routing after each epoch itself).")
    val_steps: int = hp(100, "EasyEdit: validation steps in debug mode.")
    early_stop_patience: int = hp(1000000, "EasyEdit field.")
    final_eval: bool = hp(False, "EasyEdit: evaluate and write results.json at the end of run().")
    debug: bool = hp(True, "EasyEdit: with save false, no checkpoint files are written per validation.")
    save: bool = hp(False, "EasyEdit: write trainer checkpoints.")
    silent: bool = hp(True, "EasyEdit: no per-step logging.")
    neg_per_pos: int = hp(3, "Negatives sampled per positive.")
    hard_negative_fraction: float = hp(0.5, "Share of the negatives that are hard (same image or same entity).")
    hard_negatives: bool = hp(True, "Use hard negatives at all (false for MMEdit-style data, ablation).")
    val_fraction: float = hp(0.1, "Share of training-split records held out for validation (split by entity).")
    trainer_boost: float = hp(10.0, "beta: the routed model adds s * beta to the logits of each row's own "
                                    "answer tokens, so EasyEdit's losses become a relevance loss on s.")
    loc_prompts: int = hp(16, "Training-split text prompts stored in the archive for the optional edit-time "
                              "locality KL.")
    seed: int = hp(0, "Seed of sampling, head initialisation and shuffling.")

    def validate(self, *, path: str = "<dict>") -> None:
        self.check_choice("features", FEATURES, path=path)
        self.check_choice("head", HEADS, path=path)
        self.check_choice("score_modules", SCORE_MODULES, path=path)
        if str(self.alg).upper() != "LDKE":
            raise HparamsError(f"alg is {self.alg!r}.", path=path, key="alg", fix="set `alg: LDKE`.")
        for key in ("proj_dim", "head_hidden", "batch_size", "val_batch_size", "accumulate_bs", "neg_per_pos"):
            _positive_int(self, key, path)
        _non_negative_int(self, "prior_edits", path)
        _positive_number(self, "lr", path)
        _positive_number(self, "trainer_boost", path)
        if not 0.0 <= self.hard_negative_fraction <= 1.0:
            raise HparamsError(f"expected a share in [0, 1], got {self.hard_negative_fraction!r}.", path=path,
                               key="hard_negative_fraction", fix="write e.g. 0.5.")
        if not 0.0 < self.val_fraction < 1.0:
            raise HparamsError(f"expected a share in (0, 1), got {self.val_fraction!r}.", path=path,
                               key="val_fraction", fix="write e.g. 0.1.")
        if self.train_base:
            raise HparamsError("LDKE never trains the base model.", path=path, key="train_base",
                               fix="set train_base: false.")
        if self.max_epochs is None or self.max_epochs < 1:
            raise HparamsError(f"expected a whole number >= 1, got {self.max_epochs!r}.", path=path,
                               key="max_epochs", fix="write e.g. 10.")
        if self.features == "clip" and not self.clip_model:
            raise HparamsError("features: clip needs a local CLIP checkpoint.", path=path, key="clip_model",
                               fix="set clip_model to a local CLIP directory, or use features: hidden.")


def _positive_int(obj: Any, key: str, path: str) -> None:
    value = getattr(obj, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise HparamsError(f"expected a whole number >= 1, got {value!r}.", path=path, key=key,
                           fix="write a positive integer.")


def _non_negative_int(obj: Any, key: str, path: str) -> None:
    value = getattr(obj, key)
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise HparamsError(f"expected a whole number >= 0, got {value!r}.", path=path, key=key,
                           fix="write 0 or a positive integer.")


def _positive_number(obj: Any, key: str, path: str) -> None:
    value = getattr(obj, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
        raise HparamsError(f"expected a number > 0, got {value!r}.", path=path, key=key,
                           fix="write a positive number such as 1e-3.")


def _non_negative_number(obj: Any, key: str, path: str) -> None:
    value = getattr(obj, key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise HparamsError(f"expected a number >= 0, got {value!r}.", path=path, key=key,
                           fix="write 0 or a positive number.")
