"""ASAM's base intrinsic editor (README, "Algorithm" 1): one T-Patcher-style neuron block per edit per layer.

The blocks come from the core neuron machinery (``mke_plugins.core.neurons``, gate
``"asam"``): they live outside the module tree, act only while the gate is open (inside the
returned ``GatedModel`` or :func:`~mke_plugins.core.wrap.gate_open`), and removing the last one
takes the hooks off. Per base model, one private :class:`ASAMState` (a side table keyed weakly by
the model) holds the neuron patches and the memory-bank rows that finished edits appended, each
tagged with its edit so a restore removes exactly what that call added.

This module also holds the two scope losses: the activation loss (the patch must fire, with
pre-activation at least ``m_act``, on the edit's rows at the answer-predicting positions) and the
memory loss (the mean of the top-T values of ``relu(a(q) - m_mem)`` over the bank, per neuron).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any, Hashable, Sequence

import torch
from torch import nn

from mke_plugins.adapters import VLMAdapter, unwrap_model
from mke_plugins.core.neurons import NeuronBlock, NeuronPatches, patches_for

GATE = "asam"


@dataclass
class ASAMState:
    """Per base model: the neuron patches and the bank rows added by finished edits."""

    patches: NeuronPatches
    extra_rows: list[tuple[Hashable, dict[int, torch.Tensor]]] = field(default_factory=list)
    counter: int = 0

    def new_tag(self) -> tuple[str, int]:
        self.counter += 1
        return ("asam", self.counter)

    def extra(self, layer: int) -> list[torch.Tensor]:
        return [rows[layer] for _, rows in self.extra_rows if layer in rows]

    def remove_edit(self, tag: Hashable) -> None:
        """Undo one edit: its neuron blocks and its bank rows."""
        self.patches.remove_tag(tag)
        self.extra_rows = [(t, r) for t, r in self.extra_rows if t != tag]

    @property
    def empty(self) -> bool:
        return not self.patches.blocks() and not self.extra_rows


_STATES: "weakref.WeakKeyDictionary[nn.Module, ASAMState]" = weakref.WeakKeyDictionary()


def state_for(model: Any, adapter: VLMAdapter) -> ASAMState:
    """The model's ASAM state (created on first use)."""
    base = unwrap_model(model)
    st = _STATES.get(base)
    if st is None:
        st = _STATES[base] = ASAMState(patches_for(base, adapter, gate=GATE))
    elif patches_for(base, create=False, gate=GATE) is not st.patches:
        st.patches = patches_for(base, adapter, gate=GATE)  # the core dropped an emptied registry entry
    return st


def existing_state(model: Any) -> ASAMState | None:
    return _STATES.get(unwrap_model(model))


def undo_edit(model: nn.Module, tag: Hashable) -> None:
    """Remove one edit's blocks and rows; forget the state once nothing is left."""
    base = unwrap_model(model)
    st = _STATES.get(base)
    if st is None:
        return
    st.remove_edit(tag)
    if st.empty:
        st.patches.remove_all()
        _STATES.pop(base, None)


def new_blocks(state: ASAMState, layers: Sequence[int], n: int, tag: Hashable) -> dict[int, NeuronBlock]:
    """Zero-initialised trainable blocks (V = 0: the model is unchanged until training moves V)."""
    return {layer: state.patches.add_block(layer, n, tag=tag) for layer in layers}


def init_keys_anchor(block: NeuronBlock, q: torch.Tensor, gen: torch.Generator, noise: float = 1e-3) -> None:
    """``key_init: anchor``: k_i = q_i/|q_i|^2 (cycled over the answer-predicting positions) + relative noise; b = 0."""
    q = q.detach().float()
    n = block.n
    rows = q[torch.arange(n) % q.shape[0]]
    keys = rows / rows.pow(2).sum(-1, keepdim=True).clamp_min(1e-12)
    jitter = torch.randn(keys.shape, generator=gen).to(keys.device) * noise * keys.norm(dim=-1, keepdim=True)
    _set_keys(block, keys + jitter)


def init_keys_unit(block: NeuronBlock, q: torch.Tensor, gen: torch.Generator, noise: float = 1e-3) -> None:
    """``key_init: unit``: the top right singular vector of the FFN inputs, scaled so their mean a(q) is 1."""
    q = q.detach().float()
    _, _, vh = torch.linalg.svd(q, full_matrices=False)
    v = vh[0]
    proj = (q @ v).mean()
    if proj < 0:
        v, proj = -v, -proj
    key = v / proj.clamp_min(1e-12)
    keys = key.unsqueeze(0).repeat(block.n, 1)
    jitter = torch.randn(keys.shape, generator=gen).to(keys.device) * noise * keys.norm(dim=-1, keepdim=True)
    _set_keys(block, keys + jitter)


def _set_keys(block: NeuronBlock, keys: torch.Tensor) -> None:
    with torch.no_grad():
        block.key.copy_(keys)
        if block.key_up is not None:
            block.key_up.copy_(keys)
        block.bias.zero_()
        block.value.zero_()


def activation_loss(block: NeuronBlock, q: torch.Tensor, margin: float) -> torch.Tensor:
    """Mean over rows, positions and neurons of relu(m_act - a(q)); ``q`` is (..., d)."""
    return torch.relu(margin - block.pre(q)).mean()


def memory_loss(block: NeuronBlock, memory: torch.Tensor, margin: float, top: int, chunk: int = 65536
                ) -> torch.Tensor:
    """Mean over neurons of the mean of the top-T values of relu(a(q) - m_mem), q in the bank.

    The top-T rows are found without a graph (in chunks), then only those rows are recomputed with
    one, so the gradient is exact and the bank is never copied to float32 as a whole.
    """
    if memory.shape[0] == 0:
        return block.bias.new_zeros(())
    t = min(int(top), int(memory.shape[0]))
    with torch.no_grad():
        pre = torch.cat([block.pre(memory[s:s + chunk]) for s in range(0, memory.shape[0], chunk)], dim=0)
        idx = pre.topk(t, dim=0).indices  # (t, n)
    cols = []
    for j in range(block.n):
        rows = memory[idx[:, j]].float()
        a = rows @ block.key[j] + block.bias[j]
        cols.append(torch.relu(a - margin).mean())
    return torch.stack(cols).mean()
