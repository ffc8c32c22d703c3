"""Many frozen neuron blocks of one layer evaluated as one: a handful of matmuls instead of a loop.

Why it exists: in sequential (lifelong) editing every finished edit leaves its
:class:`~mke_plugins.core.neurons.NeuronBlock` in place, and the layer's hook used to run each
block in turn on every forward pass. After 1,000 edits that is 1,000 small matmul chains per
pass, and the time per edit grows with T although each new edit trains only its own block.
:class:`FrozenStack` concatenates the keys, biases and values of the blocks that can no longer
change (every parameter frozen, no ``value_extra``) and, when they carry
:class:`~mke_plugins.core.scope.InputScope` s, their scope keys, so the whole group costs one
pass of a few matmuls whatever its size. A position's scope test is the same as the block's own
(largest cosine to one of the block's keys above the block's threshold), done for every block at
once (:func:`~mke_plugins.core.scope.admitted_pairs`); only the neurons of the blocks that admit a
position are computed there. When every scope is ``exclusive``, only the admitting block with the
closest key acts at a position (a lifelong-mode switch: the stack then is not the per-block sum).

The result equals the per-block sum up to float rounding (the sums run in another order); a
single block is never stacked, so a single edit's arithmetic is unchanged. The stack is rebuilt
when its blocks change: one is added, removed, unfrozen, given another scope, or written in
place (parameter versions).

Checking all of that means reading every stacked parameter's flags, which after 1,000 edits cost
more than the stack's arithmetic and made UniKE's time per edit grow with T. So the full check runs
once per *validity token* (:func:`split_stack`): the patches pass the gate's opening
(:func:`~mke_plugins.core.wrap.gate_opening`) and the :func:`mutations` count, which every change
made through the blocks' and patches' own API bumps (a block added or removed, ``freeze()``, a new
``scope`` or ``value_extra``). Within one opening of the gate nothing else is re-read: a parameter
of a frozen block written in place, or unfrozen by hand, while the gate stays open is seen at the
next opening (or call :func:`note_mutation`). With the gate always on there is no opening, and
every call checks in full, as does a call without a token.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from mke_plugins.core.scope import admitted_pairs

__all__ = ["FrozenStack", "mutations", "note_mutation", "split_stack", "stackable"]

_MUTATIONS = 0


def note_mutation() -> None:
    """Say that a neuron block changed: every stack checks its blocks in full on its next call."""
    global _MUTATIONS
    _MUTATIONS += 1


def mutations() -> int:
    """How many block changes :func:`note_mutation` has been told of (part of a stack's validity token)."""
    return _MUTATIONS


def stackable(block: "object") -> bool:
    """Whether ``block`` (a NeuronBlock) can join a stack: nothing of it trains or changes per call."""
    return getattr(block, "value_extra", None) is None and not any(p.requires_grad for p in block.parameters())


class FrozenStack:
    """The blocks ``blocks`` (same layer, all :func:`stackable`, same kind) as one block of their neurons."""

    def __init__(self, blocks: Sequence["object"]) -> None:
        first = blocks[0]
        self.blocks = list(blocks)
        self.gated, self.act_fn = first.gated, first.act_fn
        self._params = [p for b in self.blocks for p in b.parameters()]
        self._scopes = [b.scope for b in self.blocks]
        self._version = self._versions()
        self.token: Hashable | None = None  # the validity token the blocks were last checked under
        with torch.no_grad():
            self.key = torch.cat([b.key for b in self.blocks])  # (N, d)
            self.key_up = torch.cat([b.key_up for b in self.blocks]) if self.gated else None
            self.bias = torch.cat([b.bias for b in self.blocks])  # (N,)
            self.value_t = torch.cat([b.value for b in self.blocks], dim=1).t().contiguous()  # (N, d)
            dev = self.key.device
            # neuron -> block index, for turning a per-block scope test into a per-neuron mask
            self.neuron_block = torch.cat([torch.full((b.n,), i, dtype=torch.long, device=dev)
                                           for i, b in enumerate(self.blocks)])
            scoped = [(i, b.scope) for i, b in enumerate(self.blocks) if b.scope is not None]
            self.block_size = torch.tensor([b.n for b in self.blocks], dtype=torch.long, device=dev)
            self.block_start = torch.cumsum(self.block_size, 0) - self.block_size
            open_blocks = torch.tensor([b.scope is None for b in self.blocks], device=dev)  # never masked
            self.open_neurons = open_blocks.index_select(0, self.neuron_block).nonzero(as_tuple=True)[0]
            if scoped:
                self.scope_keys = torch.cat([s.keys.to(dev) for _, s in scoped])  # (S, d) unit rows
                self.key_block = torch.cat([torch.full((s.keys.shape[0],), i, dtype=torch.long, device=dev)
                                            for i, s in scoped])
                # an open block has no keys: its threshold is never passed (it acts everywhere instead)
                self.threshold = torch.tensor([s.threshold if s is not None else float("inf") for s in self._scopes],
                                              dtype=torch.float32, device=dev)
                self.exclusive = all(s.exclusive for _, s in scoped)
            else:
                self.scope_keys = None

    def _versions(self) -> int:
        return sum(p._version for p in self._params)

    def matches(self, blocks: Sequence["object"]) -> bool:
        """Whether this stack still stands for exactly ``blocks`` as they are now."""
        return (len(blocks) == len(self.blocks) and all(a is b for a, b in zip(blocks, self.blocks, strict=True))
                and all(b.scope is s for b, s in zip(blocks, self._scopes, strict=True))
                and not any(p.requires_grad for p in self._params) and self._versions() == self._version)

    def _dense(self, q: torch.Tensor, on: torch.Tensor | None = None) -> torch.Tensor:
        """``(P, N)`` activations of every neuron (or ``(P, |on|)`` of the neurons ``on``) at every row of ``q``."""
        key, bias, up = self.key, self.bias, self.key_up
        if on is not None:
            key, bias, up = key[on], bias[on], (up[on] if up is not None else None)
        a = self.act_fn(q @ key.t() + bias)
        return a * (q @ up.t()) if self.gated else a

    def _paired(self, q: torch.Tensor, neurons: torch.Tensor) -> torch.Tensor:
        """``(P,)`` activation of neuron ``neurons[i]`` at row ``q[i]``."""
        a = self.act_fn((q * self.key[neurons]).sum(-1) + self.bias[neurons])
        return a * (q * self.key_up[neurons]).sum(-1) if self.gated else a

    def delta(self, q: torch.Tensor) -> torch.Tensor:
        """The fp32 FFN-output change of all stacked blocks, shape ``(..., d)``.

        Without scopes every neuron runs on every position (three matmuls). With scopes, only the
        (position, neuron) pairs whose block admits the position are computed: after many edits a
        position lies inside a few scopes at most, so the cost is the scope test's one matmul.
        """
        flat = q.float().reshape(-1, q.shape[-1])
        if self.scope_keys is None:
            out = self._dense(flat) @ self.value_t
        else:
            out = flat.new_zeros(flat.shape)
            if self.open_neurons.numel():  # blocks without a scope act everywhere
                out = out + self._dense(flat, self.open_neurons) @ self.value_t[self.open_neurons]
            pos, blk = admitted_pairs(flat, self.scope_keys, self.key_block, self.threshold, self.exclusive)
            if pos.numel():  # every neuron of every admitting block, at that position
                counts = self.block_size[blk]
                rows = pos.repeat_interleave(counts)
                first = (self.block_start[blk] - (torch.cumsum(counts, 0) - counts)).repeat_interleave(counts)
                neurons = first + torch.arange(rows.numel(), device=rows.device)
                contrib = self._paired(flat[rows], neurons).unsqueeze(-1) * self.value_t[neurons]
                out = out.index_add(0, rows, contrib)
        return out.reshape(*q.shape[:-1], out.shape[-1])


def _same_kind(blocks: Sequence["object"]) -> bool:
    return all(b.gated == blocks[0].gated and b.act_fn is blocks[0].act_fn for b in blocks)


def split_stack(blocks: Sequence["object"], cached: FrozenStack | None,
                token: Hashable | None = None) -> tuple[FrozenStack | None, list]:
    """``(stack, rest)``: one stack of the leading run of stackable blocks (``cached`` while it still
    stands for them) and the blocks left to run one by one. Fewer than two stackable blocks: no stack.

    A cached stack last checked under ``token`` (not ``None``) is taken as it is; otherwise it is
    checked in full (identities, scopes, flags, versions) and, when it stands, remembers ``token``.
    The block after it is tested for stackability either way (a finished edit may have frozen).
    """
    if cached is not None and len(blocks) >= len(cached.blocks):
        n = len(cached.blocks)
        if (token is not None and cached.token == token) or cached.matches(blocks[:n]):
            cached.token = token
            if n == len(blocks) or not stackable(blocks[n]):
                return cached, list(blocks[n:])
    n = 0
    while n < len(blocks) and stackable(blocks[n]):
        n += 1
    if n < 2 or not _same_kind(blocks[:n]):
        return None, list(blocks)
    stack = FrozenStack(blocks[:n])
    stack.token = token
    return stack, list(blocks[n:])
