"""ASAM's hyperparameters (spec §3), with the value checks of spec §4 "Errors".

Every field has a ``help`` text; ``validate`` refuses combinations that cannot work and says
which field to change. Checks that need the model (``edit_layers`` in range) or the file system
(``memory_data`` readable) run at edit time and name the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp

MASK_KINDS = ("joint", "image", "text")
MEMORY_FIELDS = ("src", "text_only_prompt", "image_only_prompt", "loc", "m_loc_q")
EPS_GRID = (0.02, 0.05, 0.1, 0.2)


@dataclass
class ASAMHyperParams(MultimodalHyperParams):
    """ASAM: a T-Patcher-style neuron patch trained on the anchor plus latent adversarial variants (LAR),
    with a rank-constrained alignment loss on the variants' edit-layer states (RCSL)."""

    ALG_NAME: ClassVar[str] = "ASAM"

    # -- base editor (spec §2.1) ----------------------------------------------------------
    edit_layers: list[int] = hp([-1], "Decoder layers E that get a neuron patch per edit (negative indices count "
                                      "from the top; 7B: the last two).")
    n_neurons: int = hp(2, "Neurons per edit per edited layer (n).")
    key_init: str = hp("anchor", "Key initialisation: 'anchor' (k_i = q_i/|q_i|^2 at the answer-predicting "
                                 "positions) or 'unit' (top singular vector of the anchor's and first variants' "
                                 "FFN inputs).")
    lr: float = hp(1e-2, "Adam learning rate on the current edit's patch parameters.")
    max_steps: int = hp(100, "Maximum outer optimisation steps per edit.")
    grad_clip: float = hp(1.0, "Gradient-norm clip on the patch parameters (0 disables).")

    # -- LAR (spec §2.2) ----------------------------------------------------------------
    lar: bool = hp(True, "Enable LAR (latent variants of the anchor). lar: false with rcsl: false is the base editor.")
    lar_mode: str = hp("adversarial", "'adversarial' (PGD) or 'random' (random points in the same ball; ablation).")
    lar_variants: int = hp(8, "K, the number of latent variants per outer step.")
    lar_masks: list[str] = hp(["joint", "joint", "joint", "joint", "image", "image", "text", "text"],
                              "Mask per variant (length K): 'joint' (all prompt positions), 'image' (image tokens "
                              "of the prompt) or 'text' (the other prompt positions).")
    lar_eps: float = hp(0.1, "rho: per-token perturbation radius relative to the clean embedding norm |z_t|.")
    lar_steps: int = hp(5, "S: PGD steps per variant set.")
    lar_step_size: float | None = hp(None, "alpha: PGD step relative to |z_t| (null: 2.5 * lar_eps / lar_steps).")
    lar_regen_every: int = hp(1, "Regenerate all variants from fresh random starts every this many outer steps.")
    lar_objective: str = hp("untargeted", "'untargeted' (maximise NLL of the new answer) or 'targeted' (minimise "
                                          "NLL of the pre-edit answer).")

    # -- RCSL (spec §2.3) ---------------------------------------------------------------
    rcsl: bool = hp(True, "Enable RCSL (needs lar: true).")
    rcsl_rank: int = hp(1, "r: singular values kept; the loss is the energy beyond the first r.")
    rcsl_form: str = hp("tail", "'tail' (tail energy share) or 'nuclear' (|H|_* / sqrt(K+1) - 1; ablation).")
    asym: bool = hp(True, "Stop-gradient on the anchor row of H (asymmetric gradient flow).")

    # -- loss weights and margins (spec §2.4) -------------------------------------------------
    lambda_adv: float = hp(1.0, "Weight of the mean variant NLL.")
    lambda_rcsl: float = hp(0.1, "Weight of the RCSL loss.")
    lambda_act: float = hp(1.0, "Weight of the activation loss (the patch must fire on the unit).")
    lambda_mem: float = hp(5.0, "Weight of the memory loss (the patch stays silent on unrelated inputs); 0 needs "
                                "no memory_data.")
    act_margin: float = hp(1.0, "m_act: pre-activation the patch must reach on the unit.")
    mem_margin: float = hp(-1.0, "m_mem: pre-activation the patch must stay below on the memory bank.")
    act_tol: float = hp(0.1, "Stop only when the activation loss is at most this.")
    stop_on: str = hp("unit", "'unit' (anchor and every current variant correct) or 'anchor' (binary scope; "
                              "ablation).")

    # -- memory bank (spec §2.1 step 3) ---------------------------------------------------
    memory_data: str | None = hp(None, "Training-split records for the memory bank: an MMEdit-style JSON file "
                                       "(images relative to coco_image, else the file's folder) or a folder holding "
                                       "train.json ('@world-data' = the bundled world). Needed when lambda_mem > 0.")
    memory_fields: list[str] = hp(["src", "text_only_prompt", "image_only_prompt"],
                                  "Record fields whose prompts enter the bank: src (with image), text_only_prompt, "
                                  "image_only_prompt (with image), loc (text), m_loc_q (with m_loc). Paraphrases "
                                  "and image rephrases are never used.")
    memory_size: int = hp(1000, "Maximum number of prompts in the bank (a seeded random subset when more exist).")
    memory_positions: int | str = hp("all", "Positions per prompt: 'all' prompt positions, or N = the last prompt "
                                            "position plus N-1 random others.")
    memory_top: int = hp(200, "T: the memory loss averages the top-T pre-activations per neuron.")
    memory_cache: str | None = hp(None, "Optional folder for an on-disk copy of the bank (keyed by its fingerprint); "
                                        "null keeps it in memory only.")
    memory_batch: int = hp(32, "Prompts per forward pass when building the bank.")

    def step_size(self) -> float:
        """alpha, with the spec's default 2.5 * rho / S."""
        if self.lar_step_size is not None:
            return float(self.lar_step_size)
        return 2.5 * float(self.lar_eps) / max(1, int(self.lar_steps))

    @property
    def n_variants(self) -> int:
        """K: the number of latent variants (0 without LAR)."""
        return int(self.lar_variants) if self.lar else 0

    def validate(self, *, path: str = "<dict>") -> None:
        for key, choices in (("key_init", ("anchor", "unit")), ("lar_mode", ("adversarial", "random")),
                             ("lar_objective", ("untargeted", "targeted")), ("rcsl_form", ("tail", "nuclear")),
                             ("stop_on", ("unit", "anchor"))):
            self.check_choice(key, choices, path=path)
        if not self.edit_layers:
            raise HparamsError("edit_layers is empty.", path=path, key="edit_layers",
                               fix="list at least one decoder layer index, e.g. [-1] for the last.")
        if len(set(self.edit_layers)) != len(self.edit_layers):
            raise HparamsError(f"edit_layers {self.edit_layers} repeats a layer.", path=path, key="edit_layers",
                               fix="list each layer once.")
        for key, low in (("n_neurons", 1), ("max_steps", 1), ("memory_size", 1), ("memory_top", 1),
                         ("memory_batch", 1), ("rcsl_rank", 1)):
            if int(getattr(self, key)) < low:
                raise HparamsError(f"{key} is {getattr(self, key)}, below {low}.", path=path, key=key,
                                   fix=f"set {key} to at least {low}.")
        for key in ("lr",):
            if not float(getattr(self, key)) > 0:
                raise HparamsError(f"{key} must be positive, got {getattr(self, key)}.", path=path, key=key,
                                   fix=f"set {key} > 0.")
        for key in ("grad_clip", "lambda_adv", "lambda_rcsl", "lambda_act", "lambda_mem", "act_tol"):
            if float(getattr(self, key)) < 0:
                raise HparamsError(f"{key} must not be negative, got {getattr(self, key)}.", path=path, key=key,
                                   fix=f"set {key} >= 0.")
        if self.lar:
            if int(self.lar_variants) < 1:
                raise HparamsError(f"lar_variants is {self.lar_variants} while lar is true.", path=path,
                                   key="lar_variants", fix="set lar_variants >= 1, or lar: false (with rcsl: false).")
            if not float(self.lar_eps) > 0:
                raise HparamsError(f"lar_eps must be positive, got {self.lar_eps}.", path=path, key="lar_eps",
                                   fix="set lar_eps > 0 (the world uses 0.1, 7B models 0.05).")
            if len(self.lar_masks) != int(self.lar_variants):
                raise HparamsError(f"lar_masks has {len(self.lar_masks)} entries but lar_variants is "
                                   f"{self.lar_variants}.", path=path, key="lar_masks",
                                   fix="give one mask kind per variant.")
            bad = [m for m in self.lar_masks if m not in MASK_KINDS]
            if bad:
                raise HparamsError(f"unknown mask kind(s) {bad}.", path=path, key="lar_masks",
                                   fix=f"use only {list(MASK_KINDS)}.")
            if self.lar_mode == "adversarial" and int(self.lar_steps) < 1:
                raise HparamsError(f"lar_steps is {self.lar_steps}.", path=path, key="lar_steps",
                                   fix="set lar_steps >= 1 (or lar_mode: random).")
            if int(self.lar_regen_every) < 1:
                raise HparamsError(f"lar_regen_every is {self.lar_regen_every}.", path=path, key="lar_regen_every",
                                   fix="set lar_regen_every >= 1 (1 = every outer step).")
            if self.lar_step_size is not None and not float(self.lar_step_size) > 0:
                raise HparamsError(f"lar_step_size must be positive or null, got {self.lar_step_size}.", path=path,
                                   key="lar_step_size", fix="set it > 0, or null for 2.5 * lar_eps / lar_steps.")
        if self.rcsl and not self.lar:
            raise HparamsError("RCSL needs variants: set `lar: true`, with `lar_mode: random` for non-adversarial "
                               "ones, or `rcsl: false`.", path=path, key="rcsl",
                               fix="set lar: true, or rcsl: false (both false = the base editor).")
        if self.rcsl and int(self.rcsl_rank) >= int(self.lar_variants) + 1:
            raise HparamsError(f"rcsl_rank {self.rcsl_rank} keeps every singular value of the {self.lar_variants}+1 "
                               f"rows, so the loss is always 0.", path=path, key="rcsl_rank",
                               fix=f"set rcsl_rank below {int(self.lar_variants) + 1}.")
        if float(self.lambda_mem) > 0 and not self.memory_data:
            raise HparamsError("ASAM's memory loss needs training-split prompts: set `memory_data`, or "
                               "`lambda_mem: 0` (ablation).", path=path, key="memory_data",
                               fix="set memory_data ('@world-data' for the bundled world), or lambda_mem: 0.")
        bad_fields = [f for f in self.memory_fields if f not in MEMORY_FIELDS]
        if bad_fields or not self.memory_fields:
            raise HparamsError(f"memory_fields {self.memory_fields} is empty or has unknown fields {bad_fields}.",
                               path=path, key="memory_fields", fix=f"use a non-empty subset of {list(MEMORY_FIELDS)}.")
        mp: Any = self.memory_positions
        if not (mp == "all" or (isinstance(mp, int) and not isinstance(mp, bool) and mp >= 1)):
            raise HparamsError(f"memory_positions is {mp!r}.", path=path, key="memory_positions",
                               fix="write 'all' or a whole number >= 1.")
