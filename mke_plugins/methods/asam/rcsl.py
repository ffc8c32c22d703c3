"""RCSL: Rank-Constrained Subspace Learning (README, "Algorithm" 3).

The anchor's and the K variants' edit-layer output states at the last prompt position are
normalised to unit rows and stacked into H ((K+1) x d). The loss is the share of H's energy
outside its first r singular directions (``tail``), or the scaled nuclear norm (``nuclear``,
ablation). Uncentred on purpose: a rank-1 H means every row points the same way. The SVD is
float32; if it fails, the identical quantity comes from the eigenvalues of the Gram matrix
H Hᵀ in float64, so the term is never dropped. With ``asym`` the anchor row enters detached, so
RCSL pulls the variants towards the anchor and never moves it.
"""

from __future__ import annotations

import torch


def stack_rows(states: torch.Tensor, *, asym: bool = True) -> torch.Tensor:
    """H: the (K+1, d) states as float32 unit rows; row 0 (the anchor) detached when ``asym``."""
    h = states.float()
    h = h / h.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    if asym:
        h = torch.cat([h[:1].detach(), h[1:]], dim=0)
    return h


def singular_values(h: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``(σ, used_fallback)``: float32 ``svdvals``, else sqrt of the Gram eigenvalues in float64."""
    h = h.float()
    try:
        s = torch.linalg.svdvals(h)
        if torch.isfinite(s).all():
            return s, False
    except RuntimeError:  # torch.linalg.LinAlgError is a RuntimeError
        pass
    gram = (h.double() @ h.double().t())
    ev = torch.linalg.eigvalsh(gram).flip(0).clamp_min(0.0)
    return ev.sqrt().float(), True


def tail_energy(h: torch.Tensor, rank: int) -> tuple[torch.Tensor, bool]:
    """``Σ_{i>r} σ_i² / Σ_i σ_i²`` of H (bounded in [0, 1 - r/(K+1)] for unit rows)."""
    s, fb = singular_values(h)
    e = s.pow(2)
    return e[rank:].sum() / e.sum().clamp_min(1e-12), fb


def nuclear(h: torch.Tensor) -> tuple[torch.Tensor, bool]:
    """``‖H‖_* / sqrt(K+1) - 1`` (0 when every unit row points the same way)."""
    s, fb = singular_values(h)
    return s.sum() / (h.shape[0] ** 0.5) - 1.0, fb


def rcsl_loss(states: torch.Tensor, *, rank: int = 1, form: str = "tail", asym: bool = True
              ) -> tuple[torch.Tensor, bool]:
    """The RCSL term for (K+1, d) edit-layer states (row 0 = anchor) and whether the SVD fell back."""
    h = stack_rows(states, asym=asym)
    if form == "tail":
        return tail_energy(h, rank)
    if form == "nuclear":
        return nuclear(h)
    raise ValueError(f"rcsl_form must be 'tail' or 'nuclear', got {form!r}")


def probe_tail_energy(states: torch.Tensor, rank: int = 1) -> float:
    """Diagnostic: the tail energy of real probes' states (anchor first), no gradient."""
    with torch.no_grad():
        return float(tail_energy(stack_rows(states, asym=False), rank)[0])
