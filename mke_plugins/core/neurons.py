"""T-Patcher-style key-value neurons appended to a decoder layer's FFN, outside the module tree.

A :class:`NeuronBlock` holds n extra neurons of one layer, all fp32: keys ``key`` (n, d) (plus
``key_up`` (n, d) for gated FFNs), bias (n,), values ``value`` (d, n). For an FFN input ``q`` the
FFN output gains ``Δ(q) = act(q) @ Vᵀ`` at every position, where
``act(q) = f(q Kᵀ + b)`` for two-matrix FFNs and ``f(q K_gᵀ + b) ⊙ (q K_uᵀ)`` for gated ones
(``f`` = the layer's activation), and ``pre(q) = q Kᵀ + b`` is the pre-activation scope losses use.

Blocks of a model live in a :class:`NeuronPatches` object kept in a side registry keyed weakly by
the model (:func:`patches_for`), so ``named_parameters()``, ``state_dict()`` and the module tree
never see them. Per layer, one hook pair is installed with the first block and removed with the
last; when no block remains anywhere the registry entry is dropped too. The hooks act only while
the patches' gate is open (:mod:`mke_plugins.core.wrap`), so return ``gated(model, patches.gate)``
as ``edited_model`` and train inside ``gate_open(model, patches.gate)``.

The FFN input is read as the FFN actually received it (after any other input hooks, e.g.
UniKE's feature shift registered on the same point). Work is position-wise, so flattened OPT
FFNs, batching and KV-cache generation need nothing special. Arithmetic is fp32; the sum of all
blocks is cast to the output dtype once. Two or more finished (frozen) blocks of a layer run as one
stack (:mod:`mke_plugins.core.neuron_stack`), so a thousand edits' blocks cost a few matmuls; the
stack is checked against its blocks once per opening of the gate (writing a frozen block's
parameters in place while the gate stays open is seen at its next opening).
"""

from __future__ import annotations

import weakref
from typing import Any, Callable, Hashable, Iterator

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mke_plugins.adapters.base import LayerInfo, VLMAdapter, unwrap_model
from mke_plugins.core.neuron_stack import FrozenStack, mutations, note_mutation, split_stack
from mke_plugins.core.scope import InputScope
from mke_plugins.core.wrap import gate_opening, is_gate_open

__all__ = ["NeuronBlock", "NeuronPatches", "drop_patches", "patches_for"]


class NeuronBlock(nn.Module):
    """n fp32 key-value neurons for one layer. ``value_extra`` (optional) adds to the values (e.g. UniKE's ζ)."""

    def __init__(self, d: int, n: int, *, gated: bool, act_fn: Callable[[torch.Tensor], torch.Tensor],
                 device: torch.device | str = "cpu", layer: int = -1, tag: Hashable = None) -> None:
        super().__init__()
        if n <= 0:
            raise ValueError(f"a neuron block needs n >= 1 neurons, got {n}")
        kw = dict(dtype=torch.float32, device=device)
        self.key = nn.Parameter(torch.zeros(n, d, **kw))
        self.key_up = nn.Parameter(torch.zeros(n, d, **kw)) if gated else None
        self.bias = nn.Parameter(torch.zeros(n, **kw))
        self.value = nn.Parameter(torch.zeros(d, n, **kw))
        self.gated = gated
        self.act_fn = act_fn
        self.layer = layer
        self.tag = tag
        #: optional callable returning (d,) or (d, n) added to ``value`` (kept out of ``parameters()``)
        self.value_extra: Callable[[], torch.Tensor] | None = None
        #: optional :class:`~mke_plugins.core.scope.InputScope`: the block acts only at the positions it admits
        self.scope: InputScope | None = None

    def __setattr__(self, name: str, value: Any) -> None:
        super().__setattr__(name, value)
        if name in ("scope", "value_extra"):  # what a neuron stack reads besides the parameters
            note_mutation()

    @property
    def n(self) -> int:
        return int(self.bias.shape[0])

    def pre(self, q: torch.Tensor) -> torch.Tensor:
        """Pre-activation ``q Kᵀ + b`` (fp32), shape ``(..., n)``."""
        return q.float() @ self.key.t() + self.bias

    def act(self, q: torch.Tensor) -> torch.Tensor:
        a = self.act_fn(self.pre(q))
        if self.gated:
            a = a * (q.float() @ self.key_up.t())
        if self.scope is not None:
            a = a * self.scope.admits(q).unsqueeze(-1).to(a.dtype)
        return a

    def effective_value(self) -> torch.Tensor:
        v = self.value
        if self.value_extra is not None:
            extra = self.value_extra()
            v = v + (extra.unsqueeze(1) if extra.dim() == 1 else extra)
        return v

    def delta(self, q: torch.Tensor) -> torch.Tensor:
        """The fp32 FFN-output change ``act(q) @ Vᵀ``, shape ``(..., d)``."""
        return self.act(q) @ self.effective_value().t()

    def freeze(self) -> "NeuronBlock":
        for p in self.parameters():
            p.requires_grad_(False)
        note_mutation()
        return self

    @property
    def frozen(self) -> bool:
        return not any(p.requires_grad for p in self.parameters())


class _LayerSlot:
    def __init__(self, info: LayerInfo) -> None:
        self.info = info
        self.blocks: list[NeuronBlock] = []
        self.handles: list[RemovableHandle] = []
        self.q: torch.Tensor | None = None
        self.stack: FrozenStack | None = None  # the finished blocks, evaluated as one (core.neuron_stack)


class NeuronPatches:
    """All neuron blocks of one model; get it with :func:`patches_for`."""

    def __init__(self, model: nn.Module, adapter: VLMAdapter, gate: str = "neurons") -> None:
        self._model_ref = weakref.ref(unwrap_model(model))
        self.adapter = adapter
        self.gate = gate
        self._slots: dict[int, _LayerSlot] = {}

    @property
    def model(self) -> nn.Module:
        m = self._model_ref()
        if m is None:
            raise RuntimeError("the patched model no longer exists")
        return m

    # -- hooks ---------------------------------------------------------------------------
    def _active(self) -> bool:
        return is_gate_open(self.model, self.gate)

    def _add_to(self, slot: _LayerSlot, out: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        opening = gate_opening(self.model, self.gate)  # one full check of the stack per opening of the gate
        token = None if opening is None else (id(self), opening, mutations())
        slot.stack, rest = split_stack(slot.blocks, slot.stack, token)
        total = None if slot.stack is None else slot.stack.delta(q)
        for b in rest:
            d = b.delta(q)
            total = d if total is None else total + d
        return out if total is None else out + total.to(out.dtype)

    def _install(self, slot: _LayerSlot) -> None:
        fin, fout = slot.info.ffn_in, slot.info.ffn_out
        if fin.module is fout.module and fin.where == "input" and fout.where == "output":
            def both(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> Any:
                if not self._active() or not slot.blocks:
                    return None
                q = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
                if isinstance(output, tuple):
                    return (self._add_to(slot, output[0], q), *output[1:])
                return self._add_to(slot, output, q)

            slot.handles.append(fout.module.register_forward_hook(both, with_kwargs=True))
            return
        if fin.where != "input" or fout.where != "output":
            raise ValueError("neuron patches need ffn_in as an input point and ffn_out as an output point")

        def read_in(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
            if self._active() and slot.blocks:
                slot.q = args[0] if args else next(v for v in kwargs.values() if torch.is_tensor(v))
            return None

        def add_out(module: nn.Module, args: tuple, output: Any) -> Any:
            if slot.q is None:
                return None
            q, slot.q = slot.q, None
            if isinstance(output, tuple):
                return (self._add_to(slot, output[0], q), *output[1:])
            return self._add_to(slot, output, q)

        slot.handles.append(fin.module.register_forward_hook(read_in, with_kwargs=True))
        slot.handles.append(fout.module.register_forward_hook(add_out))

    def _uninstall(self, slot: _LayerSlot) -> None:
        while slot.handles:
            slot.handles.pop().remove()
        slot.q = None

    # -- blocks --------------------------------------------------------------------------
    def add_block(self, layer: int, n: int, *, tag: Hashable = None) -> NeuronBlock:
        """A new zero-initialised trainable block of ``n`` neurons on layer ``layer`` (negative counts from the top)."""
        infos = self.adapter.layers(self.model)
        info = infos[layer]
        d = info.value.weight.shape[0]
        block = NeuronBlock(d, n, gated=info.gated, act_fn=info.act_fn, device=info.value.weight.device,
                            layer=info.index, tag=tag)
        slot = self._slots.get(info.index)
        if slot is None:
            slot = self._slots[info.index] = _LayerSlot(info)
        if not slot.handles:
            self._install(slot)
        slot.blocks.append(block)
        note_mutation()
        return block

    def blocks(self, layer: int | None = None, tag: Hashable = None) -> list[NeuronBlock]:
        out = []
        for idx, slot in sorted(self._slots.items()):
            if layer is not None and idx != layer:
                continue
            out.extend(b for b in slot.blocks if tag is None or b.tag == tag)
        return out

    def parameters(self, tag: Hashable = None, trainable_only: bool = True) -> Iterator[nn.Parameter]:
        for b in self.blocks(tag=tag):
            for p in b.parameters():
                if p.requires_grad or not trainable_only:
                    yield p

    def remove_block(self, block: NeuronBlock) -> None:
        slot = self._slots.get(block.layer)
        if slot is None or not any(b is block for b in slot.blocks):
            return
        slot.blocks = [b for b in slot.blocks if b is not block]
        note_mutation()
        if not slot.blocks:
            self._uninstall(slot)
            del self._slots[block.layer]
        if not self._slots:
            drop_patches(self.model, self.gate)

    def remove_tag(self, tag: Hashable) -> None:
        for b in self.blocks(tag=tag):
            self.remove_block(b)

    def remove_all(self) -> None:
        for slot in list(self._slots.values()):
            self._uninstall(slot)
        self._slots.clear()
        note_mutation()
        drop_patches(self.model, self.gate)

    @property
    def empty(self) -> bool:
        return not self._slots

    def __len__(self) -> int:
        return sum(len(s.blocks) for s in self._slots.values())


_REGISTRY: "weakref.WeakKeyDictionary[nn.Module, dict[str, NeuronPatches]]" = weakref.WeakKeyDictionary()


def patches_for(model: Any, adapter: VLMAdapter | None = None, *, gate: str = "neurons",
                create: bool = True) -> NeuronPatches | None:
    """The model's neuron patches for ``gate`` (created with ``adapter`` when missing and ``create``)."""
    base = unwrap_model(model)
    per_model = _REGISTRY.get(base)
    if per_model is not None and gate in per_model:
        return per_model[gate]
    if not create:
        return None
    if adapter is None:
        raise ValueError("patches_for(model, adapter) needs the adapter the first time")
    patches = NeuronPatches(base, adapter, gate)
    _REGISTRY.setdefault(base, {})[gate] = patches
    return patches


def drop_patches(model: Any, gate: str = "neurons") -> None:
    """Forget the registry entry (hooks must already be gone; use ``remove_all`` for both)."""
    base = unwrap_model(model)
    per_model = _REGISTRY.get(base)
    if per_model is None:
        return
    patches = per_model.get(gate)
    if patches is not None and not patches.empty:
        patches.remove_all()
        return
    per_model.pop(gate, None)
    if not per_model:
        del _REGISTRY[base]
