"""UniKE's edit procedure (README steps 2–7) for one request on a model with a loaded archive.

2. vectorise the edit on the pristine model (h_sem^e, h_pos^e at each edited layer's FFN input);
3. retrieve the top K−1 bank entries by the mean over layers of cos_μ(h_sem^e, bank h_sem);
4. append M_e,l = [h_pos^e; retrieved h_pos] to each layer's latent memory (shift hooks);
5. add n_e key-value neurons per layer, keys centred on μ_l at the *shifted* FFN inputs;
6. train keys, biases, values and a per-edit W_ζ with the shifts and earlier blocks active,
   effective values V + β·W_ζ ζ (paper Eq. 6);
7. fold β·W_ζ ζ into the values, drop W_ζ, freeze (lifelong mode: give each block an input scope
   around the edit's own shifted FFN inputs).

Only ``prompt``, ``target`` and ``image`` are read; rephrase and locality fields are evaluation
data. The model's own parameters are never written.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mke_plugins.adapters.base import Batch, VLMAdapter
from mke_plugins.core.augment import edit_seed, noisy_copies
from mke_plugins.core.finite import check_finite
from mke_plugins.core.hooks import Captured, HookSet, capture
from mke_plugins.core.replay import prefix_replay
from mke_plugins.core.requests import query_of
from mke_plugins.core.scope import InputScope
from mke_plugins.core.wrap import gate_open

from .archive import Archive
from .runtime import GATE, UniKERuntime
from .stop import MarginStop
from .unike_hparams import UniKEHyperParams

log = logging.getLogger(__name__)
RETRIEVE_CHUNK = 4096
MEMORY_PENALTY_SAMPLES = 256
#: what to change when an edit's loss is no longer finite
FIX = "lower `edit_lr`, `negative_loss_weight` or `memory_loss_weight`, or load the model in float32."


@dataclass
class EditReport:
    """What one edit did (attached to the restore handle as ``stats``)."""

    edit_id: int
    steps: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    retrieved: int = 0
    seconds: float = 0.0
    converged: bool | None = None  # the stop rule was met (None: no neurons were trained)
    extra: dict[str, Any] = field(default_factory=dict)


def _states(adapter: VLMAdapter, model: nn.Module, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
    infos = adapter.layers(model)
    with torch.no_grad(), capture({layer: infos[layer].ffn_in for layer in layers},
                                  seq_shape=tuple(batch.labels.shape)) as rec:
        adapter.forward(model, batch)
    return {layer: rec[layer][0].float() for layer in layers}


def retrieve(archive: Archive, layers: list[int], h_sem: dict[int, torch.Tensor], k: int) -> torch.Tensor:
    """Indices of the top ``k`` bank entries by mean-over-layers cos_μ with the edit's h_sem."""
    n = int(archive.payload["bank.h_sem"].shape[0])
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    dev = next(iter(h_sem.values())).device
    mus = {layer: archive.mu(layer).to(dev) for layer in layers}
    q = {layer: F.normalize(h_sem[layer] - mus[layer], dim=-1) for layer in layers}
    bank = archive.bank("h_sem", layers)
    scores = torch.empty(n)
    for s in range(0, n, RETRIEVE_CHUNK):
        chunk = bank[s:s + RETRIEVE_CHUNK].to(dev).float()
        tot = torch.zeros(len(chunk), device=dev)
        for j, layer in enumerate(layers):
            tot += F.normalize(chunk[:, j] - mus[layer], dim=-1) @ q[layer]
        scores[s:s + len(chunk)] = (tot / len(layers)).cpu()
    return torch.topk(scores, k).indices


def _init_keys(x: torch.Tensor, mu: torch.Tensor, n: int, noise: float, gen: torch.Generator,
               scale: float = 1.0, threshold: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """n centred keys cycling through the rows of ``x`` (P, d): pre-activation 1 there, 0 at μ.

    With ``scale`` s and ``threshold`` θ (project choice) the gate key becomes s·k with bias −s·(k·μ + θ):
    the pre-activation is s·(p − θ) for p = (x − μ)·k, the projection that is 1 at the edit state, so
    inputs projecting below θ start with a negative gate. Returns (gate key, bias, up key = k)."""
    d = x.shape[-1]
    rows = x[torch.arange(n) % len(x)]
    c = rows - mu
    k = c / (c.norm(dim=-1, keepdim=True) ** 2).clamp_min(1e-12)
    if noise > 0:
        eps = torch.randn(k.shape, generator=gen).to(k.device)
        k = k + eps * (noise * k.norm(dim=-1, keepdim=True) / d ** 0.5)
    b = -(k @ mu)
    return scale * k, scale * (b - threshold), k


def edit_one(model: nn.Module, tok: Any, request: Mapping[str, Any], hparams: UniKEHyperParams,
             adapter: VLMAdapter, archive: Archive, rt: UniKERuntime, layers: list[int]) -> EditReport:
    """Apply one UniKE edit (README steps 2–7); returns its report. The edit is ``rt.edits[report.edit_id]``."""
    t0 = time.time()
    infos = adapter.layers(model)
    batch = adapter.batch(model, tok, [query_of(request)])
    answer = batch.answer_positions()[0]
    last = int(batch.target_mask[0].nonzero().max())
    eid = rt.new_edit()
    rep = EditReport(eid)
    rt.alpha_mode, rt.alpha_fixed = hparams.alpha_mode, float(hparams.alpha_fixed)
    rt.alpha_threshold = float(hparams.alpha_threshold)

    # 2. vectorise on the pristine model
    with rt.pristine():
        st = _states(adapter, model, batch, layers)
    h_sem = {layer: st[layer][answer[0]] for layer in layers}
    h_pos = {layer: st[layer][last] for layer in layers}
    earlier: list[Batch] = []
    if bool(hparams.negatives_from_edits) and float(hparams.negative_loss_weight) > 0 and hparams.use_intrinsic:
        earlier = [v for k, v in rt.edit_inputs.items() if not _same_question(v, batch)]
        rt.edit_inputs[eid] = batch  # later edits' negatives (dropped with the edit)

    # 3-4. retrieve and install the latent memories
    if hparams.use_external:
        idx = retrieve(archive, layers, h_sem, int(hparams.top_k) - 1)
        rep.retrieved = int(len(idx))
        bank_pos = archive.bank("h_pos", layers)[idx].float()
        for j, layer in enumerate(layers):
            info = infos[layer]
            dev = info.value.weight.device
            rt.ensure_layer(info, archive.sem_encoder(layer, dev), archive.mu(layer).to(dev))
            keys = [("edit", eid)] + [("bank", archive.path, int(i)) for i in idx.tolist()]
            values = torch.cat([h_pos[layer][None].to(dev), bank_pos[:, j].to(dev)], 0)
            rt.add_memory(eid, layer, keys, values)

    if not hparams.use_intrinsic:
        rep.seconds = time.time() - t0
        return rep

    # locality negatives (project choice): the nearest bank questions, shifted like the model would shift
    # them, and the inputs of earlier edits as the edited model now sees them
    negatives = _negatives(archive, layers, infos, rt, h_sem, int(hparams.negatives))
    past_inputs = _current_inputs(adapter, model, earlier, layers, infos)

    answer_mask = batch.answer_mask
    if hparams.use_external and hparams.scope_threshold is not None and hparams.scope_memory:
        _scope_memory(adapter, model, batch, rt, eid, sorted(layers), hparams)

    # 5. key-value neurons on the shifted inputs
    with gate_open(model, GATE), torch.no_grad(), \
            capture({layer: infos[layer].ffn_in for layer in layers}, positions=answer_mask) as rec:
        adapter.forward(model, batch)
    shifted = {layer: rec[layer].float() for layer in layers}
    gen = torch.Generator().manual_seed(int(hparams.seed))
    patches = rt.patches
    blocks, w_zetas = [], []
    for layer in layers:
        info = infos[layer]
        dev = info.value.weight.device
        mu = archive.mu(layer).to(dev)
        block = patches.add_block(layer, int(hparams.num_neurons), tag=("unike", eid))
        rt.blocks[eid].append(block)
        k, b, k_up = _init_keys(shifted[layer].to(dev), mu, int(hparams.num_neurons), float(hparams.key_noise), gen,
                                float(hparams.key_scale), float(hparams.key_threshold))
        with torch.no_grad():
            block.key.copy_(k)
            block.bias.copy_(b)
            if block.key_up is not None:
                block.key_up.copy_(k_up)
        if hparams.use_zeta and float(hparams.beta) != 0.0:
            w = nn.Parameter(archive.w_zeta(layer).to(dev).clone())
            zeta = archive.zeta(layer).to(dev)
            beta = float(hparams.beta)
            block.value_extra = (lambda w=w, zeta=zeta, beta=beta: beta * (w @ zeta))
            w_zetas.append(w)
        blocks.append(block)

    # 6. train with the shifts and earlier blocks active
    params = [p for blk in blocks for p in blk.parameters()] + w_zetas
    opt = torch.optim.Adam(params, lr=float(hparams.edit_lr))
    stop = MarginStop(float(hparams.margin_tol), int(hparams.margin_patience))
    penalty_states = _penalty_states(archive, layers, infos) if hparams.memory_loss_weight > 0 else None
    # fit_copies: the fit also reads noisy copies of the edit input (core.augment; an extension of the paper)
    copies = noisy_copies(adapter, model, tok, batch, copies=int(hparams.fit_copies), noise=float(hparams.fit_noise),
                          seed=edit_seed(hparams.seed, eid))
    fit_batch = copies.batch if copies is not None else batch
    # only layers >= min(layers) change: each step re-runs those from the state the first pass gave them
    start = min(layers) if hparams.prefix_replay and copies is None else None
    points = {layer: infos[layer].ffn_in for layer in layers} if float(hparams.positive_margin) > 0 else {}
    with gate_open(model, GATE), prefix_replay(adapter, model, start) as replayed, HookSet() as hooks:
        if copies is not None:
            hooks.add(copies.point, copies.add_noise)
        for step in range(int(hparams.max_edit_steps) + 1):
            with capture(points, positions=fit_batch.answer_mask) as fed:
                rows = replayed.answer_logits(model, fit_batch).loss(reduction="row")
            loss, copy_loss = rows[0], (rows[1:].mean() if copies is not None else None)
            value = float(loss.detach())
            if rep.first_loss is None:
                rep.first_loss = value
            rep.final_loss = value
            margins = _margin_loss(blocks, hparams, negatives, past_inputs, fed)
            check_finite("UniKE", step + 1, nll=loss, copies=copy_loss, margin=margins, fix=FIX)
            rep.converged = value < float(hparams.stop_loss) and stop.margin_met(margins)
            if rep.converged or step == int(hparams.max_edit_steps):
                break
            total = loss
            if penalty_states is not None:
                pen = sum(blk.act(penalty_states[blk.layer]).abs().mean().to(loss.device) for blk in blocks)
                total = total + float(hparams.memory_loss_weight) * pen
            if margins is not None:
                total = total + float(hparams.negative_loss_weight) * margins.to(loss.device)
            opt.zero_grad()
            (total if copy_loss is None else total + copy_loss).backward()
            torch.nn.utils.clip_grad_norm_(params, float(hparams.grad_clip))
            opt.step()
            rep.steps += 1

    rep.extra.update(stop.report())

    # 7. fold β W_ζ ζ into the values, drop W_ζ, freeze
    with torch.no_grad():
        for layer, blk in zip(layers, blocks, strict=True):
            if blk.value_extra is not None:
                blk.value.add_(blk.value_extra().unsqueeze(1))
                blk.value_extra = None
            blk.freeze()
            if hparams.scope_threshold is not None:  # lifelong mode: the finished edit acts only near its own inputs
                blk.scope = InputScope.around(shifted[layer], float(hparams.scope_threshold),
                                                hparams.scope_exclusive)
    rep.seconds = time.time() - t0
    return rep


def _scope_memory(adapter: VLMAdapter, model: nn.Module, batch: Batch, rt: UniKERuntime, eid: int,
                  layers: list[int], hparams: UniKEHyperParams) -> None:
    """Lifelong mode (``scope_memory``): give edit ``eid``'s latent-memory entries a scope, layer by layer
    from the lowest, around the FFN inputs its own answer positions bring to each shift hook (with the
    lower layers' entries already scoped, as later inputs will meet them). Set before the edit trains,
    so it trains with the memory as it will act afterwards."""
    for layer in layers:
        rt.record_inputs = True
        try:
            with gate_open(model, GATE), torch.no_grad():
                adapter.forward(model, batch)
            x = rt.last_input[layer]
        finally:
            rt.record_inputs = False
            rt.last_input.clear()
        reps = x.reshape(-1, x.shape[-1])[batch.answer_mask.reshape(-1).to(x.device)]
        rt.memories[layer].set_scope(eid, rt.edits[eid][layer], InputScope.around(
            reps, float(hparams.scope_threshold), bool(hparams.scope_exclusive)))


def _penalty_states(archive: Archive, layers: list[int], infos: list[Any]) -> dict[int, torch.Tensor]:
    n = int(archive.payload["bank.h_sem"].shape[0])
    idx = torch.arange(min(n, MEMORY_PENALTY_SAMPLES))
    bank = archive.bank("h_sem", layers)[idx].float()
    return {layer: bank[:, j].to(infos[layer].value.weight.device) for j, layer in enumerate(layers)}


def _margin_loss(blocks: list[Any], hparams: UniKEHyperParams, negatives: dict[int, torch.Tensor],
                 past: dict[int, torch.Tensor], fed: Captured | None = None) -> torch.Tensor | None:
    """T-Patcher-style memory loss on the new neurons' gate pre-activations (project choice): mean
    relu(pre + margin) over the bank negatives and, as a separate equally weighted group, over earlier
    edits' inputs; with ``positive_margin`` also T-Patcher's activation loss, mean relu(positive_margin -
    max over the block's neurons of pre) over the answer-position inputs ``fed`` of this step. None when off."""
    if float(hparams.negative_loss_weight) <= 0:
        return None
    m = float(hparams.negative_margin)
    dev = blocks[0].bias.device  # each block's term beside its layer; summed on the first block's device
    total = sum(F.relu(blk.pre(negatives[blk.layer]) + m).mean().to(dev) for blk in blocks if blk.layer in negatives)
    total = total + sum(F.relu(blk.pre(past[blk.layer]) + m).mean().to(dev) for blk in blocks if blk.layer in past)
    pos = float(hparams.positive_margin)
    if pos > 0 and fed is not None:
        total = total + sum(F.relu(pos - blk.pre(fed[blk.layer].float()).max(-1).values).mean().to(dev)
                            for blk in blocks)
    return total if torch.is_tensor(total) else None


def _same_question(a: Batch, b: Batch) -> bool:
    """Whether two edit batches ask the same question (a re-edit): equal prompt tokens and equal image
    tensors. Batches whose token ids do not align with their labels are never called the same."""
    ia, ib = a.inputs.get("input_ids"), b.inputs.get("input_ids")
    if not (torch.is_tensor(ia) and torch.is_tensor(ib)) or ia.shape != a.labels.shape or ib.shape != b.labels.shape:
        return False
    pa, pb = ia[a.labels == -100], ib[b.labels == -100]
    if pa.shape != pb.shape or not torch.equal(pa, pb):
        return False
    for key in set(a.inputs) | set(b.inputs):
        if "pixel" in key or "image" in key:
            xa, xb = a.inputs.get(key), b.inputs.get(key)
            if torch.is_tensor(xa) != torch.is_tensor(xb):
                return False
            if torch.is_tensor(xa) and (xa.shape != xb.shape or not torch.equal(xa, xb)):
                return False
    return True


def _current_inputs(adapter: VLMAdapter, model: nn.Module, batches: list[Batch], layers: list[int],
                    infos: list[Any]) -> dict[int, torch.Tensor]:
    """The (shifted) FFN inputs that earlier edits' own inputs reach now, with every installed edit
    active, at their answer positions: layer -> (Σ P, d); empty without batches."""
    rows: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    for b in batches:
        with gate_open(model, GATE), torch.no_grad(), \
                capture({layer: infos[layer].ffn_in for layer in layers}, positions=b.answer_mask) as rec:
            adapter.forward(model, b)
        for layer in layers:
            rows[layer].append(rec[layer].float())
    return {layer: torch.cat(v, 0) for layer, v in rows.items() if v}


def _negatives(archive: Archive, layers: list[int], infos: list[Any], rt: UniKERuntime,
               h_sem: dict[int, torch.Tensor], n: int) -> dict[int, torch.Tensor]:
    """The ``n`` bank h_sem states nearest to the edit's (by the retrieval score), per layer, each passed
    through the layer's current latent-memory shift so they live where the new keys read (project choice).

    On a small world the nearest bank questions are the same relation asked about other entities: the
    inputs a relation-level key would also fire on. Layers above the first edited one see the pristine
    state plus the shift (earlier neurons are assumed silent on them, which the margin loss enforces)."""
    if n <= 0:
        return {}
    idx = retrieve(archive, layers, h_sem, n)
    bank = archive.bank("h_sem", layers)[idx].float()
    out: dict[int, torch.Tensor] = {}
    with torch.no_grad():
        for j, layer in enumerate(layers):
            x = bank[:, j].to(infos[layer].value.weight.device)
            out[layer] = rt.shift_states(infos[layer].index, x).float()
    return out
