"""When UniKE's margin loss counts as met, so that an edit's training may stop before ``max_edit_steps``.

The loop stops once the target NLL is below ``stop_loss`` *and* the locality margin loss (a project
choice, see ``edit._margin_loss``) is met. Met used to mean only "below ``margin_tol``" (0.01), but on
the world the margin loss ends an edit's 50 steps far above that (0.15–0.62 on train-split edits)
while the NLL ends far below ``stop_loss`` (0.006 vs 0.1), so every edit ran to the step cap.
``margin_patience`` adds a rule that can fire: the margin also counts as met once it has stopped
falling, i.e. it fell by less than ``margin_tol`` over the last ``margin_patience`` steps. With
``margin_patience: 0`` (the default) the rule is the tolerance alone, as before. The loop asks only
on steps where the NLL rule holds, so the plateau is judged over the last N such steps: an edit
stops at the earliest N + 1 steps after its NLL first fell below ``stop_loss``.
"""

from __future__ import annotations

from typing import Any

import torch


class MarginStop:
    """Tracks the margin loss over an edit's steps and says whether it counts as met."""

    def __init__(self, tol: float, patience: int) -> None:
        self.tol, self.patience = tol, patience
        self.history: list[float] = []
        self.plateau = False  # the last "met" came from the plateau rule, not the tolerance

    def margin_met(self, margin: torch.Tensor | None) -> bool:
        """Record this step's margin loss (None: the margin loss is off) and say whether it is met."""
        if margin is None:
            return True
        value = float(margin.detach())
        self.history.append(value)
        if value < self.tol:
            self.plateau = False
            return True
        if self.patience > 0 and len(self.history) > self.patience:
            self.plateau = self.history[-1 - self.patience] - value < self.tol
            return self.plateau
        return False

    def report(self) -> dict[str, Any]:
        """The first and last margin loss asked about (steps where the NLL rule held) and whether a stop came
        from the plateau rule (bench ``extra``)."""
        if not self.history:
            return {}
        return {"margin_first": self.history[0], "margin_final": self.history[-1], "margin_plateau": self.plateau}
