"""UniKE's hyperparameters: editing (``UniKEHyperParams``) and offline (``UniKETrainingHparams``).

Two classes because two different programs read them: EasyEdit's ``MultimodalEditor`` (and our
bench) edit with ``UniKEHyperParams``, whose only link to the offline stage is ``archive``; the
offline stage (``mke-plugins train UniKE`` or EasyEdit's ``MultimodalTrainer``) builds that
archive from ``UniKETrainingHparams``, which also carries every field EasyEdit's trainer reads.

The defaults are the 7B values (README, "Hyperparameters"); ``hparams/world.yaml`` and
``hparams/training/world.yaml`` hold the values for the bundled world model. Each field declares
its constraints (``hp(..., ge=...)``, ``Literal`` choices); ``validate`` holds the rules across
fields. ``archive`` may be ``"@unike/<file>"``: a file shipped inside this package
(``archives/``; ``"@bundled/<file>"`` is the deprecated spelling). The official spelling
``UNIKE`` is accepted and normalised to ``UniKE``; EasyEdit's unrelated text method ``UnKE`` is
refused by name.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import ClassVar, Literal

from mke_hooks import HparamsError
from mke_plugins.core.augment import copies_hp, noise_hp
from mke_plugins.hparams import MultimodalHyperParams, hp
from mke_plugins.trainer_hparams import EasyEditTrainerFields

_REFUSED = {
    name: (f"alg_name {name!r} is EasyEdit's own, unrelated text method UnKE (and dataset), not UniKE "
           f"(Pan et al., NeurIPS 2024).")
    for name in ("UnKE", "UNKE", "unke", "Unke")
}
_REFUSED.update({name: f"alg_name is case-sensitive: {name!r} is not 'UniKE'." for name in ("unike", "Unike")})


@dataclass
class UniKEHyperParams(MultimodalHyperParams):
    """Editing hyperparameters of UniKE (intrinsic neurons + external latent memory)."""

    ALG_NAME: ClassVar[str] = "UniKE"
    ALG_ALIASES: ClassVar[dict[str, str]] = {"UNIKE": "UniKE"}
    ALG_REFUSED: ClassVar[dict[str, str]] = _REFUSED

    alg_name: str = hp("UniKE", "Must be 'UniKE' (the official spelling 'UNIKE' is accepted; EasyEdit's "
                                "unrelated 'UnKE' is refused).")
    archive: str | None = hp(
        None, "Path of the offline archive (bank, encoders, zeta); required. Build it with "
              "`mke-plugins train UniKE --hparams <training yaml>` or EasyEdit's MultimodalTrainer with "
              "`alg: UniKE`. '@unike/<file>' names an archive shipped in the package.")
    layers: list[int] = hp([-4, -3, -2, -1], "Edited decoder layers; negative indices count from the top. Must "
                                              "be covered by the archive.", nonempty=True, distinct=True)
    num_neurons: int = hp(10, "n_e: new key-value neurons per edited layer per edit.", ge=1)
    top_k: int = hp(40, "K: memory entries per edit and layer (the edit's own entry + K-1 retrieved from the "
                        "bank).", ge=1)
    alpha_mode: Literal["dynamic", "fixed"] = hp(
        "dynamic", "'dynamic': alpha from the semantic encoder per position; 'fixed': alpha_fixed.")
    alpha_fixed: float = hp(0.5, "The mixing weight of external knowledge when alpha_mode is 'fixed'.",
                            ge=0, le=1)
    alpha_threshold: float = hp(0.0, "Dynamic alpha below this is set to 0, so a position whose state does not "
                                     "match the latent memory is not shifted at all (project choice); 0 = the "
                                     "paper's shift at every position with alpha > 0.", ge=0, lt=1)
    beta: float = hp(0.1, "Scale of zeta' = W_zeta zeta added to every new value row.", ge=0)
    use_intrinsic: bool = hp(True, "Add trained key-value neurons (false: external knowledge only).")
    use_external: bool = hp(True, "Install the latent memory feature shifts (false: intrinsic neurons only).")
    use_zeta: bool = hp(True, "Add beta * W_zeta zeta to the new values (false: no truthfulness direction).")
    edit_lr: float = hp(7.5e-4, "Adam learning rate of the new keys, biases, values and W_zeta.", gt=0)
    max_edit_steps: int = hp(20, "Optimisation step cap per edit.", ge=1)
    prefix_replay: bool = hp(
        True, "Speed only: the training loop re-runs only the decoder layers from the lowest edited one up, from the "
              "state the full forward gave it (core.replay); the logits are the same. false runs the full model "
              "every step.")
    fit_copies: int = copies_hp("the edit input", " An extension of the paper: the loss adds the copies' mean NLL "
                                                 "to the clean input's; the stop rule reads the clean input's.")
    fit_noise: float = noise_hp()
    stop_loss: float = hp(0.1, "Stop early once the mean target NLL is below this.", ge=0)
    grad_clip: float = hp(1.0, "Maximum gradient norm per edit step.", gt=0)
    key_noise: float = hp(0.01, "Relative noise on repeated key initialisations (std = key_noise * |k| / sqrt(d)).",
                          ge=0)
    memory_loss_weight: float = hp(0.0, "Weight of the Transformer-Patcher memory penalty: the mean activation "
                                        "magnitude of the new neurons on bank h_sem states (for gated FFNs the "
                                        "SiLU(gate)*up product can be negative, so |activation| is penalised); "
                                        "0 = off. Helps sequential editing at some cost in text generality.", ge=0)
    negatives: int = hp(0, "Locality negatives per edit (project choice): the bank h_sem states nearest to the "
                           "edit's h_sem (same-relation questions about other entities), shifted by the current "
                           "latent memory, feed the margin loss (negative_loss_weight); 0 = off.", ge=0)
    negatives_from_edits: bool = hp(True, "With negative_loss_weight > 0, also use the earlier edits' inputs (their "
                                          "answer-position FFN inputs as the edited model now sees them; the "
                                          "edit batches are kept until the edit is removed) as negatives, so a "
                                          "new edit's neurons stay silent on them (T-Patcher's memory of past "
                                          "edits; project choice).")
    key_scale: float = hp(1.0, "s: the gate key and bias are multiplied by s at init, so the pre-activation is "
                               "s*(p - key_threshold) where p is the input's projection on the centred key (1 at "
                               "the edit state). 1 with key_threshold 0 = the plain centred init (project choice).",
                       gt=0)
    key_threshold: float = hp(0.0, "theta: projection below which a new neuron's gate starts negative (see "
                                   "key_scale); e.g. 0.8 keeps relation-mates (projection ~0.6) silent while "
                                   "rephrasings (~0.95) still fire (project choice).")
    negative_margin: float = hp(4.0, "Margin loss target: the gate pre-activation of every new neuron on every "
                                     "locality negative should be <= -negative_margin (SiLU(-4) ~ -0.07).", ge=0)
    negative_loss_weight: float = hp(0.0, "Weight of the margin loss mean(relu(pre(negative) + negative_margin)) "
                                          "(T-Patcher's memory loss on locality negatives); 0 = off.", ge=0)
    positive_margin: float = hp(0.0, "Activation target (T-Patcher's activation loss; project choice): at each answer "
                                     "position of the edit input and of its noisy copies, the largest gate "
                                     "pre-activation of the edit's new neurons in each layer should be >= "
                                     "positive_margin; the shortfall mean(relu(positive_margin - pre)) joins the "
                                     "margin loss (same weight, same stop rule). 0 = off. Single edits only: with "
                                     "scope_threshold (lifelong mode) it lowered every quality column of the "
                                     "development sequence, so the lifelong mode keeps 0 (README, 'Sequential: the "
                                     "lifelong mode').", ge=0)
    margin_tol: float = hp(0.01, "With the margin loss on (negative_loss_weight > 0), training stops only once "
                                 "it is below this (as well as the NLL below stop_loss).", ge=0)
    margin_patience: int = hp(0, "0 = the margin loss is met only below margin_tol; N: it also counts as met once "
                                 "it fell by less than margin_tol over the last N steps whose NLL was below "
                                 "stop_loss (it has settled: the rule that lets an edit stop before "
                                 "max_edit_steps on the world; README, 'Measurements').", ge=0)
    scope_threshold: float | None = hp(
        None, "Lifelong mode: once an edit is trained, its neurons act only at positions whose FFN input has a "
              "cosine above this to one of the edit's own (shifted) answer-position FFN inputs (core.scope; "
              "README, 'Sequential editing'). null (default): no scope, UniKE as specified. Recommended for long "
              "sequences on the bundled lifelong model: 0.925 with scope_memory: true, scope_exclusive: true, "
              "positive_margin: 0 and negatives_from_edits: false (the scopes keep edits apart; the margin over "
              "every earlier edit's input costs time that grows with the sequence).", ge=-1, lt=1)
    scope_exclusive: bool = hp(
        False, "Lifelong mode, with scope_threshold: where the scopes of several finished edits admit a position, "
               "only the edit with the closest key acts there (core.scope), so edits of neighbouring facts do not "
               "add up on each other's inputs. false: every admitting edit acts.")
    scope_memory: bool = hp(
        False, "Lifelong mode, with scope_threshold: the edit's latent-memory entries also get a scope (its own "
               "answer-position FFN inputs as the shift hook receives them, same threshold and exclusivity): a "
               "position is shifted only by the entries of the edits that admit it, and not at all where none "
               "does (README, 'Sequential editing'). false: every entry shifts every input (UniKE as specified).")
    seed: int = hp(42, "Seed of the key noise (torch RNG seeded per edit).", ge=0)

    def validate(self, *, path: str = "<dict>") -> None:
        """At least one of the two kinds of knowledge is edited; the activation margin has a weight."""
        super().validate(path=path)
        if not (self.use_intrinsic or self.use_external):
            raise HparamsError("use_intrinsic and use_external are both false: the edit would do nothing.",
                               path=path, key="use_intrinsic", fix="set at least one of them to true.")
        if float(self.positive_margin) > 0 and float(self.negative_loss_weight) <= 0:
            raise HparamsError(f"positive_margin is {self.positive_margin!r} but negative_loss_weight is "
                               f"{self.negative_loss_weight!r}: the activation loss joins the margin loss at that "
                               "weight, so it would do nothing.", path=path, key="positive_margin",
                               fix="set negative_loss_weight > 0 (0.2 in lifelong.yaml), or positive_margin: 0.")
        if float(self.positive_margin) > 0 and self.scope_threshold is not None:
            warnings.warn(f"{path}: positive_margin {self.positive_margin} with scope_threshold "
                          f"{self.scope_threshold} (the lifelong mode) lowered every quality column of UniKE's "
                          "development sequence; the lifelong mode recommends positive_margin: 0 (UniKE README, "
                          "'Sequential: the lifelong mode').", UserWarning, stacklevel=2)


@dataclass
class UniKETrainingHparams(EasyEditTrainerFields, MultimodalHyperParams):
    """Offline-stage hyperparameters (README, "Offline stage"), plus the fields EasyEdit's trainer reads.

    The same file drives ``mke-plugins train UniKE --hparams FILE`` and
    ``MultimodalTrainer(config=UniKETrainingHparams.from_hparams(FILE), ...)``. For the trainer,
    ``cedit: 1``, ``iedit: 0`` and ``cloc: 0`` are required: with them the trainer's total loss is
    exactly UniKE's contrastive loss.
    """

    ALG_NAME: ClassVar[str] = "UniKE"
    ALG_ALIASES: ClassVar[dict[str, str]] = {"UNIKE": "UniKE"}
    ALG_REFUSED: ClassVar[dict[str, str]] = _REFUSED

    alg_name: str = hp("UniKE", "Must be 'UniKE'.")
    alg: Literal["UniKE", "UNIKE"] = hp("UniKE", "EasyEdit trainer key (upper-cased to UNIKE in ALG_TRAIN_DICT); "
                                                 "'UniKE' ('UNIKE' is normalised to it).")
    # -- offline stage ---------------------------------------------------------------------------
    layers: list[int] = hp([-4, -3, -2, -1], "Layers whose FFN inputs are banked and get encoders; negative "
                                              "indices count from the top. Editing layers must be a subset.",
                           nonempty=True, distinct=True)
    data: str = hp("@world-train", "CLI default data: '@world-train' (the world's train split) or an MMEdit JSON "
                                   "file (then `image_root` is its image folder).")
    image_root: str = hp("", "Image folder of an MMEdit JSON given in `data` (default: the JSON's folder).")
    out: str = hp("", "Where the CLI writes the archive (default: ./unike-<model>.pt).")
    bank_size: int = hp(20000, "Maximum triplets in the bank.", ge=1)
    include_variants: bool = hp(True, "Also bank the rephrased-question and rephrased-image triplets of a record.")
    tru_dim: int | None = hp(256, "d_t, output size of the truthfulness encoder; null = the hidden size d.",
                         ge=1)
    shared_encoders: bool = hp(False, "One encoder pair for all layers (the official code's layout).")
    tau: float = hp(0.1, "Contrastive temperature.", gt=0)
    enc_lr: float = hp(1e-4, "Adam learning rate of the encoders (CLI; the trainer uses `lr`, which defaults "
                             "to this).", gt=0)
    enc_batch_size: int = hp(256, "Triplets per encoder batch (a trainer batch is filled up to this by replay).",
                             ge=1)
    enc_epochs: int = hp(20, "Encoder epochs over the cached bank (CLI).", ge=1)
    holdout: float = hp(0.05, "Held-out fraction of triplets for epoch selection (CLI).", ge=0, lt=0.5)
    patience: int = hp(5, "CLI: stop after this many epochs without a better held-out score.", ge=1)
    zeta_fit_size: int | None = hp(4096, "Triplets whose output residual states are kept for the W_zeta fit; "
                                         "null = all.", ge=1)
    ridge: float = hp(1e-3, "Ridge lambda of the W_zeta decoder fit.", gt=0)
    seed: int = hp(42, "Seed of shuffling, holdout split, replay and encoder initialisation.", ge=0)
    # -- EasyEdit MultimodalTrainer fields (hooks/EASYEDIT-NOTES.md): the rest come from EasyEditTrainerFields -
    inner_params: list[str] = hp([], "EasyEdit trainer: parameter names checked against the model (unused by "
                                      "UniKE; may stay empty).")
    lr: float | None = hp(None, "EasyEdit trainer: optimiser learning rate of the encoders; null = enc_lr.",
                          gt=0)
    cedit: float = hp(1.0, "EasyEdit trainer: weight of the edit loss; must be 1 (the loss is UniKE's L).")
    iedit: float = hp(0.0, "EasyEdit trainer: weight of the image edit loss; must be 0.")
    cloc: float = hp(0.0, "EasyEdit trainer: weight of the locality loss; must be 0.")
    archive: str | None = hp(None, "EasyEdit trainer: an earlier trainer save (or UniKE archive) to resume from.")
    grad_clip: float = hp(100.0, "EasyEdit trainer: gradient clipping of the encoders.", ge=0)
    max_epochs: int | None = hp(None, "EasyEdit trainer: epochs over the train set; null = enc_epochs.",
                                ge=1)
    val_interval: int = hp(500, "EasyEdit trainer: steps between validations (each saves the archive).",
                           ge=1)
    save: bool = hp(True, "EasyEdit trainer: write the archive.")
    results_dir: str = hp("./results", "EasyEdit trainer: output root; the archive is models/UniKE/<model basename>.")

    def normalize(self) -> None:
        """``alg: UNIKE`` spelled ``UniKE``; ``lr`` and ``max_epochs`` (without ``max_iters``) default to the CLI's."""
        super().normalize()
        if self.alg == "UNIKE":
            self.alg = "UniKE"
        if self.lr is None:
            self.lr = self.enc_lr
        if self.max_epochs is None and self.max_iters is None:
            self.max_epochs = self.enc_epochs

    def validate(self, *, path: str = "<dict>") -> None:
        """The trainer's total loss must be exactly UniKE's contrastive loss."""
        super().validate(path=path)
        for key, want in (("cedit", 1.0), ("iedit", 0.0), ("cloc", 0.0)):
            if float(getattr(self, key)) != want:
                raise HparamsError(
                    f"{key} is {getattr(self, key)!r}, but UniKE's offline stage needs cedit: 1, iedit: 0, cloc: 0: "
                    f"then MultimodalTrainer's total loss (cedit*l_edit + cloc*(l_loc+l_image_loc) + "
                    f"iedit*l_image_edit) is exactly UniKE's contrastive loss L.", path=path, key=key,
                    fix=f"set `{key}: {int(want)}`.")
