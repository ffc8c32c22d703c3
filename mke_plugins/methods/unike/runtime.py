"""UniKE's per-model runtime (README, "Inference"): latent memories, feature-shift hooks, neurons.

Everything lives outside the model's module tree, in a side registry keyed weakly by the base
model, so ``named_parameters()`` and ``state_dict()`` never see it:

* per edited layer, the latent memory M_l (all edits' entries; bank entries shared by several
  edits are stored once, with a reference count) and the frozen EncSem_l and μ_l;
* one gated forward pre-hook per layer on the FFN input that applies the feature shift
  x′ = (1−α)x + α·h_know (installed once, idempotent on an edited model);
* the key-value neuron blocks, in the core's ``NeuronPatches`` under the same gate, which read
  the FFN input after the shift.

The gate (:data:`GATE`) is opened by the ``GatedModel`` returned as ``edited_model`` and inside
training; :func:`set_active` keeps it open on the bare model. When the last edit is removed,
every hook and the registry entry go, so the model is bit-identical to the original.
"""

from __future__ import annotations

import contextlib
import math
import weakref
from typing import Any, Hashable, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from mke_plugins.adapters.base import LayerInfo, VLMAdapter, unwrap_model
from mke_plugins.core.hooks import HookSet
from mke_plugins.core.neurons import NeuronPatches, patches_for
from mke_plugins.core.scope import InputScope, admitted_pairs, stack_keys
from mke_plugins.core.wrap import _GATES, is_gate_open, set_always_on

GATE = "unike"


class _LayerMemory:
    """The latent memory of one layer: entries keyed by origin, stacked on demand.

    Lifelong mode (``scope_memory``): an edit may give its entries an input scope
    (:meth:`set_scope`); a position is then shifted only by the entries of edits whose scope admits
    it (and by those of edits without a scope), and a position no edit admits is not shifted.
    """

    def __init__(self, info: LayerInfo, enc_sem: nn.Module, mu: torch.Tensor) -> None:
        self.info = info
        self.enc_sem = enc_sem
        self.mu = mu
        self.entries: dict[Hashable, list[Any]] = {}  # key -> [tensor (d,), refcount: the edits holding it]
        #: lifelong mode: edit id -> (its entry keys, where they act)
        self.scopes: dict[int, tuple[list[Hashable], InputScope]] = {}
        self._stacked: torch.Tensor | None = None
        self._scoped: tuple[Any, ...] | None = None

    def add(self, key: Hashable, value: torch.Tensor) -> None:
        if key in self.entries:
            self.entries[key][1] += 1
        else:
            self.entries[key] = [value.detach().float().clone(), 1]
        self._stacked = self._scoped = None

    def release(self, key: Hashable) -> None:
        entry = self.entries.get(key)
        if entry is None:
            return
        entry[1] -= 1
        if entry[1] <= 0:
            del self.entries[key]
        self._stacked = self._scoped = None

    def set_scope(self, eid: int, keys: list[Hashable], scope: InputScope) -> None:
        """From now on, edit ``eid``'s entries ``keys`` shift only the positions ``scope`` admits."""
        self.scopes[eid] = (list(keys), scope)
        self._scoped = None

    def drop_scope(self, eid: int) -> None:
        if self.scopes.pop(eid, None) is not None:
            self._scoped = None

    @property
    def matrix(self) -> torch.Tensor:
        if self._stacked is None:
            self._stacked = torch.stack([v for v, _ in self.entries.values()]) if self.entries else None
        return self._stacked  # type: ignore[return-value]

    def allowed(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
        """``(used, mask)``: the entries some position of ``x`` may use (``(u,)`` indices into
        :attr:`matrix`) and which position may use which of them (``(..., u)`` bool); ``None``: all
        entries everywhere (no scope). Neither grows with the entries no position may use."""
        if not self.scopes:
            return None
        if self._scoped is None:
            index = {k: i for i, k in enumerate(self.entries)}
            scopes = list(self.scopes.values())
            # the entries of each scoped edit, padded with a dummy column (index len(index)) to one width
            cols = [[index[k] for k in keys] for keys, _ in scopes]
            ent = torch.full((len(cols), max(len(c) for c in cols)), len(index), dtype=torch.long)
            held = torch.zeros(len(index) + 1, dtype=torch.long)  # per entry: the scoped edits holding it
            for i, c in enumerate(cols):
                ent[i, :len(c)] = torch.tensor(c, dtype=torch.long)
                held[ent[i, :len(c)]] += 1
            refs = torch.tensor([n for _, n in self.entries.values()], dtype=torch.long)
            free = (refs > held[:-1]).nonzero(as_tuple=True)[0]  # also held by an unscoped edit: act everywhere
            keys, owner, thresholds = stack_keys([sc.keys for _, sc in scopes], [sc.threshold for _, sc in scopes])
            exclusive = all(sc.exclusive for _, sc in scopes)  # as the neuron stack decides it
            self._scoped = (keys, owner, thresholds, ent, free, exclusive)
        keys, owner, thresholds, ent, free, exclusive = self._scoped
        flat = x.reshape(-1, x.shape[-1])
        rows, who = admitted_pairs(flat, keys, owner, thresholds, exclusive)
        dev, dummy = x.device, len(self.entries)
        cols = ent.to(dev)[who]  # (pairs, width): after many edits most positions lie in no scope
        used = torch.unique(torch.cat([cols[cols != dummy], free.to(dev)]))  # sorted
        mask = torch.zeros(flat.shape[0], used.numel(), dtype=torch.bool, device=dev)
        if rows.numel():
            hit = cols != dummy
            mask[rows.unsqueeze(1).expand_as(cols)[hit], torch.searchsorted(used, cols[hit])] = True
        if free.numel():
            mask[:, torch.searchsorted(used, free.to(dev))] = True
        return used, mask.view(*x.shape[:-1], -1)

    def __len__(self) -> int:
        return len(self.entries)


class UniKERuntime:
    """UniKE's state on one model (get it with :func:`runtime_for`)."""

    def __init__(self, model: nn.Module, adapter: VLMAdapter) -> None:
        self._model_ref = weakref.ref(unwrap_model(model))
        self.adapter = adapter
        self.memories: dict[int, _LayerMemory] = {}
        self.hooks: dict[int, HookSet] = {}
        self.edits: dict[int, dict[int, list[Hashable]]] = {}  # edit id -> layer -> memory keys
        self.blocks: dict[int, list[Any]] = {}  # edit id -> neuron blocks
        #: edit id -> the edit's teacher-forced batch (prompt, target, image only): later edits keep their
        #: neurons silent on its inputs (locality negatives, project choice)
        self.edit_inputs: dict[int, Any] = {}
        self.next_id = 0
        self.alpha_mode = "dynamic"
        self.alpha_fixed = 0.5
        self.alpha_threshold = 0.0  # dynamic α below it is 0: no shift where the memory does not match
        self.suspended = 0
        self.last_alpha: dict[int, torch.Tensor] = {}  # diagnostics: last α per layer (detached)
        self.record_alpha = False
        #: lifelong mode: the FFN input each shift hook received last (before the shift), while set
        self.last_input: dict[int, torch.Tensor] = {}
        self.record_inputs = False

    @property
    def model(self) -> nn.Module:
        m = self._model_ref()
        if m is None:
            raise RuntimeError("the edited model no longer exists")
        return m

    @property
    def patches(self) -> NeuronPatches:
        p = patches_for(self.model, self.adapter, gate=GATE)
        assert p is not None
        return p

    def active(self) -> bool:
        return self.suspended == 0 and is_gate_open(self.model, GATE)

    @contextlib.contextmanager
    def pristine(self) -> Iterator[None]:
        """Run the model with every UniKE edit inactive, even if :func:`set_active` is on."""
        st = _GATES.get(self.model)
        always = st is not None and GATE in st.always
        if always:
            set_always_on(self.model, GATE, False)
        self.suspended += 1
        try:
            yield
        finally:
            self.suspended -= 1
            if always:
                set_always_on(self.model, GATE, True)

    # -- the feature shift (README, "Inference") ----------------------------------------------
    def _shift(self, mem: _LayerMemory, x: torch.Tensor, force: bool = False) -> torch.Tensor | None:
        if not (force or self.active()) or len(mem) == 0:
            return None
        if self.record_inputs and not force:
            self.last_input[mem.info.index] = x.detach()
        M = mem.matrix
        xf = x.float()
        d = xf.shape[-1]
        scoped = mem.allowed(xf)
        allowed = None
        if scoped is not None:  # lifelong mode: each position sees only the entries of edits admitting it
            # only the entries some position may use take part, so the cost does not grow with the other edits
            used, allowed = scoped
            if used.numel() == 0:
                return None  # no position lies in any scope: nothing is shifted
            M = M.index_select(0, used)
        scores = xf @ M.t() / math.sqrt(d)
        if allowed is not None:
            scores = scores.masked_fill(~allowed, float("-inf"))
            reached = allowed.any(-1, keepdim=True)
            scores = scores.masked_fill(~reached, 0.0)  # a position no edit admits: no NaN, no shift (below)
        p = torch.softmax(scores, dim=-1)
        hk = p @ M
        hk = hk * (xf.norm(dim=-1, keepdim=True) / hk.norm(dim=-1, keepdim=True).clamp_min(1e-6))
        if self.alpha_mode == "fixed":
            alpha = torch.full_like(xf[..., :1], float(self.alpha_fixed))
        else:
            e = mem.enc_sem(hk)
            alpha = F.cosine_similarity(e - mem.mu, xf - mem.mu, dim=-1).clamp(0.0, 1.0).unsqueeze(-1)
            if self.alpha_threshold > 0:
                alpha = alpha.masked_fill(alpha < self.alpha_threshold, 0.0)
        if allowed is not None:
            alpha = alpha * reached
        if self.record_alpha and not force:
            self.last_alpha[mem.info.index] = alpha.detach().squeeze(-1)
        return ((1.0 - alpha) * xf + alpha * hk).to(x.dtype)

    def shift_states(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """``x`` shifted by layer ``layer``'s current latent memory, whatever the gate (``x`` if it has none)."""
        mem = self.memories.get(layer)
        if mem is None or len(mem) == 0:
            return x
        out = self._shift(mem, x, force=True)
        return x if out is None else out

    def ensure_layer(self, info: LayerInfo, enc_sem: nn.Module, mu: torch.Tensor) -> _LayerMemory:
        """The layer's memory, creating it (and its hook, once) when missing."""
        mem = self.memories.get(info.index)
        if mem is None:
            mem = self.memories[info.index] = _LayerMemory(info, enc_sem, mu)
        else:  # the latest archive's encoder and mean serve every entry of the layer
            mem.enc_sem, mem.mu = enc_sem, mu
        if info.index not in self.hooks:
            hs = HookSet()
            hs.add(info.ffn_in, lambda x, mem=mem: self._shift(mem, x))
            self.hooks[info.index] = hs
        return mem

    # -- edits -------------------------------------------------------------------------------
    def new_edit(self) -> int:
        eid = self.next_id
        self.next_id += 1
        self.edits[eid] = {}
        self.blocks[eid] = []
        return eid

    def add_memory(self, eid: int, layer: int, keys: list[Hashable], values: torch.Tensor) -> None:
        mem = self.memories[layer]
        for k, v in zip(keys, values, strict=False):
            mem.add(k, v)
        self.edits[eid].setdefault(layer, []).extend(keys)

    def remove_edit(self, eid: int) -> None:
        """Remove one edit's memory entries and neuron blocks; tear everything down when none remains."""
        for layer, keys in self.edits.pop(eid, {}).items():
            mem = self.memories.get(layer)
            if mem is None:
                continue
            for k in keys:
                mem.release(k)
            mem.drop_scope(eid)
        patches = patches_for(self.model, gate=GATE, create=False)
        self.edit_inputs.pop(eid, None)
        for block in self.blocks.pop(eid, []):
            if patches is not None:
                patches.remove_block(block)
        for layer in [li for li, m in self.memories.items() if len(m) == 0]:
            del self.memories[layer]
            hs = self.hooks.pop(layer, None)
            if hs is not None:
                hs.remove()
        if not self.edits:
            self.teardown()

    def teardown(self) -> None:
        """Remove every hook, block and memory, and the registry entry."""
        for hs in self.hooks.values():
            hs.remove()
        self.hooks.clear()
        self.memories.clear()
        self.edits.clear()
        self.blocks.clear()
        self.edit_inputs.clear()
        patches = patches_for(self.model, gate=GATE, create=False)
        if patches is not None:
            patches.remove_all()
        set_always_on(self.model, GATE, False)
        _RUNTIMES.pop(self.model, None)

    @property
    def n_edits(self) -> int:
        return len(self.edits)


_RUNTIMES: "weakref.WeakKeyDictionary[nn.Module, UniKERuntime]" = weakref.WeakKeyDictionary()


def runtime_for(model: Any, adapter: VLMAdapter | None = None, *, create: bool = True) -> UniKERuntime | None:
    """The model's UniKE runtime (created with ``adapter`` when missing and ``create``)."""
    base = unwrap_model(model)
    rt = _RUNTIMES.get(base)
    if rt is None and create:
        if adapter is None:
            raise ValueError("runtime_for(model, adapter) needs the adapter the first time")
        rt = _RUNTIMES[base] = UniKERuntime(base, adapter)
    return rt


def set_active(model: Any, on: bool = True) -> None:
    """Make UniKE's edits act on the bare model too (``on=False`` limits them to ``edited_model`` again)."""
    set_always_on(unwrap_model(model), GATE, on)


def restore_all(model: Any) -> None:
    """Remove every UniKE edit from ``model``: hooks, neurons, memories and the registry entry."""
    rt = runtime_for(model, create=False)
    if rt is not None:
        rt.teardown()
    else:
        patches = patches_for(model, gate=GATE, create=False)
        if patches is not None:
            patches.remove_all()
        set_always_on(unwrap_model(model), GATE, False)
