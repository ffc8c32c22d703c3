"""Stop an optimisation loop as soon as a loss term is no longer a finite number.

Every method calls :func:`check_finite` once per step with its loss terms by name, so a blown-up
learning rate or loss weight ends the edit with a :class:`~mke_hooks.NonFiniteLossError` naming
the method, the step and the term, instead of writing ``nan`` into the weights and reporting
success.
"""

from __future__ import annotations

import math

import torch

from mke_hooks import NonFiniteLossError

#: what to change when a loss term blows up (methods may pass a more specific ``fix``)
DEFAULT_FIX = ("lower the learning rate or the weight of that loss term, or load the model in float32 "
               "(half precision overflows sooner).")


def first_non_finite(value: torch.Tensor | float) -> float | None:
    """The first ``inf`` / ``nan`` in ``value`` (a tensor or a number), or None when all are finite."""
    if torch.is_tensor(value):
        bad = value.detach()[~torch.isfinite(value.detach())]
        return float(bad.reshape(-1)[0]) if bad.numel() else None
    return None if math.isfinite(float(value)) else float(value)


def check_finite(method: str, step: int, /, *, fix: str = DEFAULT_FIX, where: str = "step",
                 **terms: torch.Tensor | float | None) -> None:
    """Raise ``NonFiniteLossError`` for the first of ``terms`` holding ``inf`` / ``nan`` (None terms are off).

    ``step`` counts from 1; ``where`` names what it counts (``"outer step"``).
    """
    for term, value in terms.items():
        bad = None if value is None else first_non_finite(value)
        if bad is not None:
            raise NonFiniteLossError(method, step, term, repr(bad), where=where, fix=fix)
