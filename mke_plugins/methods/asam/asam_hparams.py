"""ASAM's hyperparameters (README, "Hyperparameters"), with their value checks.

Every field has a ``help`` text and declares its constraints (``hp(..., ge=...)``, ``Literal``
choices), which the base checks; ``validate`` refuses combinations of fields that cannot work
and says which field to change. Checks that need the model (``edit_layers`` in range) or the
file system (``memory_data`` readable) run at edit time and name the same fields.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Literal

from mke_hooks import HparamsError
from mke_plugins.hparams import MultimodalHyperParams, hp

MaskKind = Literal["joint", "image", "text"]
MemoryField = Literal["src", "text_only_prompt", "image_only_prompt", "loc", "m_loc_q"]
EPS_GRID = (0.02, 0.05, 0.1, 0.2)


@dataclass
class ASAMHyperParams(MultimodalHyperParams):
    """ASAM: a T-Patcher-style neuron patch trained on the anchor plus latent adversarial variants (LAR),
    with a rank-constrained alignment loss on the variants' edit-layer states (RCSL)."""

    ALG_NAME: ClassVar[str] = "ASAM"

    # -- base editor (README, "Algorithm" 1) ----------------------------------------------
    edit_layers: list[int] = hp([-1], "Decoder layers E that get a neuron patch per edit (negative indices count "
                                      "from the top; 7B: the last two).", nonempty=True, distinct=True)
    n_neurons: int = hp(2, "Neurons per edit per edited layer (n).", ge=1)
    key_init: Literal["anchor", "unit"] = hp(
        "anchor", "Key initialisation: 'anchor' (k_i = q_i/|q_i|^2 at the answer-predicting positions) or 'unit' "
                  "(top singular vector of the anchor's and first variants' FFN inputs).")
    lr: float = hp(1e-2, "Adam learning rate on the current edit's patch parameters.", gt=0)
    max_steps: int = hp(100, "Maximum outer optimisation steps per edit.", ge=1)
    grad_clip: float = hp(1.0, "Gradient-norm clip on the patch parameters (0 disables).", ge=0)
    scope_threshold: float | None = hp(
        None, "Lifelong mode: once an edit is trained, its blocks act only at positions whose FFN input has a "
              "cosine above this to one of the edit's anchor representations (core.scope; README, 'Sequential "
              "editing'). null (default): no scope, the paper's editor. Recommended for sequential editing on the "
              "bundled lifelong model: 0.9 with lambda_mem: 0 and scope_exclusive: true (the scope then does the "
              "memory loss's work, in a third of the time); a cosine on the model's own representation, so pick "
              "it on development edits for another model.",
        ge=-1, lt=1)
    scope_exclusive: bool = hp(
        False, "Lifelong mode, with scope_threshold: where the scopes of several finished edits admit a position, "
               "only the edit with the closest key acts there (core.scope), so edits of neighbouring facts do not "
               "add up on each other's inputs. false: every admitting edit acts.")
    prefix_replay: bool = hp(
        True, "Speed only: the PGD passes and the main pass re-run only the decoder layers, from the state the "
              "first full forward handed to layer 0 (vision tower, embeddings, mask and positions are not "
              "computed again; core.replay); the logits are the same. false runs the full model every pass.")

    # -- LAR (README, "Algorithm" 2) ----------------------------------------------------
    lar: bool = hp(True, "Enable LAR (latent variants of the anchor). lar: false with rcsl: false is the base editor.")
    lar_mode: Literal["adversarial", "random"] = hp(
        "adversarial", "'adversarial' (PGD) or 'random' (random points in the same ball; ablation).")
    lar_variants: int = hp(8, "K, the number of latent variants per outer step (>= 1 with lar: true).",
                           ge=0)
    lar_masks: list[MaskKind] = hp(["joint", "joint", "joint", "joint", "image", "image", "text", "text"],
                                   "Mask per variant (length K): 'joint' (all prompt positions), 'image' (image "
                                   "tokens of the prompt) or 'text' (the other prompt positions).")
    lar_eps: float = hp(0.1, "rho: per-token perturbation radius relative to the clean embedding norm |z_t| "
                             "(> 0 with lar: true).", ge=0)
    lar_steps: int = hp(5, "S: PGD steps per variant set (>= 1 with lar_mode: adversarial).", ge=0)
    lar_step_size: float | None = hp(None, "alpha: PGD step relative to |z_t| (null: 2.5 * lar_eps / lar_steps).",
                                     gt=0)
    lar_regen_every: int = hp(1, "Regenerate all variants from fresh random starts every this many outer "
                                  "steps (1: every step, the paper's loop; N > 1 reuses a set for N steps, "
                                  "saving PGD passes: README, 'Measurements').", ge=1)
    lar_fresh_stop: bool = hp(True, "With lar_regen_every > 1, accept the stop rule only on variants generated "
                                    "against the current patch: when it holds on an older set, regenerate and "
                                    "check again (one forward, no update) before stopping. No effect at 1.")
    lar_objective: Literal["untargeted", "targeted"] = hp(
        "untargeted", "'untargeted' (maximise NLL of the new answer) or 'targeted' (minimise NLL of the pre-edit "
                      "answer).")

    # -- RCSL (README, "Algorithm" 3) ---------------------------------------------------
    rcsl: bool = hp(True, "Enable RCSL (needs lar: true).")
    rcsl_rank: int = hp(1, "r: singular values kept; the loss is the energy beyond the first r.", ge=1)
    rcsl_form: Literal["tail", "nuclear"] = hp(
        "tail", "'tail' (tail energy share) or 'nuclear' (|H|_* / sqrt(K+1) - 1; ablation).")
    asym: bool = hp(True, "Stop-gradient on the anchor row of H (asymmetric gradient flow).")

    # -- loss weights and margins (README, "Algorithm" 4) -------------------------------------
    lambda_adv: float = hp(1.0, "Weight of the mean variant NLL.", ge=0)
    lambda_rcsl: float = hp(0.1, "Weight of the RCSL loss.", ge=0)
    lambda_act: float = hp(1.0, "Weight of the activation loss (the patch must fire on the unit).", ge=0)
    lambda_mem: float = hp(5.0, "Weight of the memory loss (the patch stays silent on unrelated inputs); 0 needs "
                                "no memory_data.", ge=0)
    act_margin: float = hp(1.0, "m_act: pre-activation the patch must reach on the unit.")
    mem_margin: float = hp(-1.0, "m_mem: pre-activation the patch must stay below on the memory bank.")
    act_tol: float = hp(0.1, "Stop only when the activation loss is at most this.", ge=0)
    stop_on: Literal["unit", "anchor"] = hp(
        "unit", "'unit' (anchor and every current variant correct) or 'anchor' (binary scope; ablation).")

    # -- memory bank (README, "Algorithm" 5, "The memory bank") ----------------------------
    memory_data: str | None = hp(None, "Training-split records for the memory bank: an MMEdit-style JSON file "
                                       "(images relative to coco_image, else the file's folder) or a folder holding "
                                       "train.json ('@world-data' = the bundled world). Needed when lambda_mem > 0.")
    memory_fields: list[MemoryField] = hp(["src", "text_only_prompt", "image_only_prompt"],
                                          "Record fields whose prompts enter the bank: src (with image), "
                                          "text_only_prompt, image_only_prompt (with image), loc (text), m_loc_q "
                                          "(with m_loc). Paraphrases and image rephrases are never used.",
                                          nonempty=True)
    memory_size: int = hp(1000, "Maximum number of prompts in the bank (a seeded random subset when more exist).",
                          ge=1)
    memory_positions: int | Literal["all"] = hp(
        "all", "Positions per prompt: 'all' prompt positions, or N = the last prompt position plus N-1 random "
               "others.", ge=1)
    memory_top: int = hp(200, "T: the memory loss averages the top-T pre-activations per neuron.", ge=1)
    memory_cache: str | None = hp(None, "Optional folder for an on-disk copy of the bank (keyed by its fingerprint); "
                                        "null keeps it in memory only.")
    memory_batch: int = hp(32, "Prompts per forward pass when building the bank.", ge=1)

    def step_size(self) -> float:
        """alpha, by default 2.5 * rho / S (``lar_step_size: null``)."""
        if self.lar_step_size is not None:
            return float(self.lar_step_size)
        return 2.5 * float(self.lar_eps) / max(1, int(self.lar_steps))

    @property
    def n_variants(self) -> int:
        """K: the number of latent variants (0 without LAR)."""
        return int(self.lar_variants) if self.lar else 0

    def validate(self, *, path: str = "<dict>") -> None:
        """LAR's settings when ``lar`` is on, RCSL's need of LAR, the memory loss's need of ``memory_data``."""
        super().validate(path=path)
        if self.lar:
            self._validate_lar(path)
        if self.rcsl and not self.lar:
            raise HparamsError("RCSL needs variants: set `lar: true`, with `lar_mode: random` for non-adversarial "
                               "ones, or `rcsl: false`.", path=path, key="rcsl",
                               fix="set lar: true, or rcsl: false (both false = the base editor).")
        if self.rcsl and self.rcsl_rank >= self.lar_variants + 1:
            raise HparamsError(f"rcsl_rank {self.rcsl_rank} keeps every singular value of the {self.lar_variants}+1 "
                               f"rows, so the loss is always 0.", path=path, key="rcsl_rank",
                               fix=f"set rcsl_rank below {self.lar_variants + 1}.")
        if self.lambda_mem > 0 and not self.memory_data:
            raise HparamsError("ASAM's memory loss needs training-split prompts: set `memory_data`, or "
                               "`lambda_mem: 0` (ablation).", path=path, key="memory_data",
                               fix="set memory_data ('@world-data' for the bundled world), or lambda_mem: 0.")

    def _validate_lar(self, path: str) -> None:
        """LAR's settings, which matter only with ``lar: true``."""
        if self.lar_variants < 1:
            raise HparamsError(f"lar_variants is {self.lar_variants} while lar is true.", path=path,
                               key="lar_variants", fix="set lar_variants >= 1, or lar: false (with rcsl: false).")
        if not self.lar_eps > 0:
            raise HparamsError(f"lar_eps must be positive, got {self.lar_eps}.", path=path, key="lar_eps",
                               fix="set lar_eps > 0 (the world uses 0.1, 7B models 0.05).")
        if len(self.lar_masks) != self.lar_variants:
            raise HparamsError(f"lar_masks has {len(self.lar_masks)} entries but lar_variants is "
                               f"{self.lar_variants}.", path=path, key="lar_masks",
                               fix="give one mask kind per variant.")
        if self.lar_mode == "adversarial" and self.lar_steps < 1:
            raise HparamsError(f"lar_steps is {self.lar_steps}.", path=path, key="lar_steps",
                               fix="set lar_steps >= 1 (or lar_mode: random).")
