"""UniKE's two encoders (README, "Offline stage") and their archive (de)serialisation.

* ``SemEncoder`` (EncSem_l): d → d, ``h + Linear(GELU(Linear(h)))`` with the second Linear
  zero-initialised, so it starts as the identity and stays in the raw hidden space (its output
  is compared with raw FFN inputs at edit time).
* ``TruEncoder`` (EncTru_l): d → d_t, ``Linear → GELU → Linear``.

Weights are fp32. Per layer by default; with ``shared_encoders`` one pair serves every layer and
is stored once under the key ``shared``.
"""

from __future__ import annotations

from typing import Any, Iterable

import torch
from torch import nn


class SemEncoder(nn.Module):
    """Residual MLP d → d that starts as the identity."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h + self.fc2(nn.functional.gelu(self.fc1(h)))


class TruEncoder(nn.Module):
    """MLP d → d_t."""

    def __init__(self, d: int, d_t: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(d, d)
        self.fc2 = nn.Linear(d, d_t)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(h)))


def build_encoders(layers: list[int], d: int, d_t: int, shared: bool) -> tuple[nn.ModuleDict, nn.ModuleDict]:
    """Fresh encoders keyed by layer index (as strings); shared ones are one object under every key."""
    if shared:
        sem, tru = SemEncoder(d), TruEncoder(d, d_t)
        return (nn.ModuleDict({str(layer): sem for layer in layers}),
                nn.ModuleDict({str(layer): tru for layer in layers}))
    return (nn.ModuleDict({str(layer): SemEncoder(d) for layer in layers}),
            nn.ModuleDict({str(layer): TruEncoder(d, d_t) for layer in layers}))


def _owner_keys(layers: list[int], shared: bool) -> list[str]:
    return ["shared"] if shared else [str(layer) for layer in layers]


def encoder_state(sem: nn.ModuleDict, tru: nn.ModuleDict, layers: list[int], shared: bool) -> dict[str, torch.Tensor]:
    """Flat ``enc_sem.<l>.*`` / ``enc_tru.<l>.*`` tensors (``<l>`` = ``shared`` when shared), fp32 on CPU."""
    out: dict[str, torch.Tensor] = {}
    for owner in _owner_keys(layers, shared):
        key = str(layers[0]) if owner == "shared" else owner
        for prefix, mods in (("enc_sem", sem), ("enc_tru", tru)):
            for name, t in mods[key].state_dict().items():
                out[f"{prefix}.{owner}.{name}"] = t.detach().to("cpu", torch.float32).clone()
    return out


def load_encoder_state(sem: nn.ModuleDict, tru: nn.ModuleDict, payload: dict[str, Any], layers: list[int],
                       shared: bool) -> None:
    """Copy archive tensors into existing encoders (the trainer's ``load_state_dict``)."""
    for owner in _owner_keys(layers, shared):
        key = str(layers[0]) if owner == "shared" else owner
        for prefix, mods in (("enc_sem", sem), ("enc_tru", tru)):
            pre = f"{prefix}.{owner}."
            state = {k[len(pre):]: v for k, v in payload.items() if k.startswith(pre)}
            mods[key].load_state_dict(state)


def load_encoders(payload: dict[str, Any], meta: dict[str, Any], only: Iterable[int] | None = None
                  ) -> tuple[dict[int, SemEncoder], dict[int, TruEncoder]]:
    """Encoders rebuilt from an archive payload (CPU, fp32), for ``only`` these layers."""
    layers = [int(layer) for layer in meta["layers"]]
    shared = bool(meta.get("shared_encoders", False))
    d, d_t = int(meta["d"]), int(meta["d_t"])
    want = [int(layer) for layer in only] if only is not None else layers
    sem: dict[int, SemEncoder] = {}
    tru: dict[int, TruEncoder] = {}
    for layer in want:
        owner = "shared" if shared else str(layer)
        s, t = SemEncoder(d), TruEncoder(d, d_t)
        for prefix, mod in (("enc_sem", s), ("enc_tru", t)):
            pre = f"{prefix}.{owner}."
            mod.load_state_dict({k[len(pre):]: v for k, v in payload.items() if k.startswith(pre)})
        sem[layer], tru[layer] = s, t
    return sem, tru
