"""UniKE's edit procedure (spec §3, steps 2–7) for one request on a model with a loaded archive.

2. vectorise the edit on the pristine model (h_sem^e, h_pos^e at each edited layer's FFN input);
3. retrieve the top K−1 bank entries by the mean over layers of cos_μ(h_sem^e, bank h_sem);
4. append M_e,l = [h_pos^e; retrieved h_pos] to each layer's latent memory (shift hooks);
5. add n_e key-value neurons per layer, keys centred on μ_l at the *shifted* FFN inputs;
6. train keys, biases, values and a per-edit W_ζ with the shifts and earlier blocks active,
   effective values V + β·W_ζ ζ (paper Eq. 6);
7. fold β·W_ζ ζ into the values, drop W_ζ, freeze.

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
from mke_plugins.core.hooks import capture
from mke_plugins.core.requests import query_of
from mke_plugins.core.wrap import gate_open

from .archive import Archive
from .runtime import GATE, UniKERuntime
from .unike_hparams import UniKEHyperParams

log = logging.getLogger(__name__)
RETRIEVE_CHUNK = 4096
MEMORY_PENALTY_SAMPLES = 256


@dataclass
class EditReport:
    """What one edit did (attached to the restore handle as ``stats``)."""

    edit_id: int
    steps: int = 0
    first_loss: float | None = None
    final_loss: float | None = None
    retrieved: int = 0
    seconds: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


def _states(adapter: VLMAdapter, model: nn.Module, batch: Batch, layers: list[int]) -> dict[int, torch.Tensor]:
    infos = adapter.layers(model)
    with torch.no_grad(), capture({l: infos[l].ffn_in for l in layers}, seq_shape=tuple(batch.labels.shape)) as rec:
        adapter.forward(model, batch)
    return {l: rec[l][0].float() for l in layers}


def retrieve(archive: Archive, layers: list[int], h_sem: dict[int, torch.Tensor], k: int) -> torch.Tensor:
    """Indices of the top ``k`` bank entries by mean-over-layers cos_μ with the edit's h_sem."""
    n = int(archive.payload["bank.h_sem"].shape[0])
    k = min(k, n)
    if k <= 0:
        return torch.zeros(0, dtype=torch.long)
    dev = next(iter(h_sem.values())).device
    mus = {l: archive.mu(l).to(dev) for l in layers}
    q = {l: F.normalize(h_sem[l] - mus[l], dim=-1) for l in layers}
    bank = archive.bank("h_sem", layers)
    scores = torch.empty(n)
    for s in range(0, n, RETRIEVE_CHUNK):
        chunk = bank[s:s + RETRIEVE_CHUNK].to(dev).float()
        tot = torch.zeros(len(chunk), device=dev)
        for j, l in enumerate(layers):
            tot += F.normalize(chunk[:, j] - mus[l], dim=-1) @ q[l]
        scores[s:s + len(chunk)] = (tot / len(layers)).cpu()
    return torch.topk(scores, k).indices


def _init_keys(x: torch.Tensor, mu: torch.Tensor, n: int, noise: float, gen: torch.Generator
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """n centred keys cycling through the rows of ``x`` (P, d): pre-activation 1 there, 0 at μ."""
    d = x.shape[-1]
    rows = x[torch.arange(n) % len(x)]
    c = rows - mu
    k = c / (c.norm(dim=-1, keepdim=True) ** 2).clamp_min(1e-12)
    if noise > 0:
        eps = torch.randn(k.shape, generator=gen).to(k.device)
        k = k + eps * (noise * k.norm(dim=-1, keepdim=True) / d ** 0.5)
    b = -(k @ mu)
    return k, b


def edit_one(model: nn.Module, tok: Any, request: Mapping[str, Any], hparams: UniKEHyperParams,
             adapter: VLMAdapter, archive: Archive, rt: UniKERuntime, layers: list[int]) -> EditReport:
    """Apply one UniKE edit (spec §3 steps 2–7); returns its report. The edit is ``rt.edits[report.edit_id]``."""
    t0 = time.time()
    infos = adapter.layers(model)
    batch = adapter.batch(model, tok, [query_of(request)])
    answer = batch.answer_positions()[0]
    last = int(batch.target_mask[0].nonzero().max())
    eid = rt.new_edit()
    rep = EditReport(eid)
    rt.alpha_mode, rt.alpha_fixed = hparams.alpha_mode, float(hparams.alpha_fixed)

    # 2. vectorise on the pristine model
    with rt.pristine():
        st = _states(adapter, model, batch, layers)
    h_sem = {l: st[l][answer[0]] for l in layers}
    h_pos = {l: st[l][last] for l in layers}

    # 3-4. retrieve and install the latent memories
    if hparams.use_external:
        idx = retrieve(archive, layers, h_sem, int(hparams.top_k) - 1)
        rep.retrieved = int(len(idx))
        bank_pos = archive.bank("h_pos", layers)[idx].float()
        for j, l in enumerate(layers):
            info = infos[l]
            dev = info.value.weight.device
            rt.ensure_layer(info, archive.sem_encoder(l, dev), archive.mu(l).to(dev))
            keys = [("edit", eid)] + [("bank", archive.path, int(i)) for i in idx.tolist()]
            values = torch.cat([h_pos[l][None].to(dev), bank_pos[:, j].to(dev)], 0)
            rt.add_memory(eid, l, keys, values)

    if not hparams.use_intrinsic:
        rep.seconds = time.time() - t0
        return rep

    # 5. key-value neurons on the shifted inputs
    answer_mask = batch.answer_mask
    with gate_open(model, GATE), torch.no_grad(), \
            capture({l: infos[l].ffn_in for l in layers}, positions=answer_mask) as rec:
        adapter.forward(model, batch)
    shifted = {l: rec[l].float() for l in layers}
    gen = torch.Generator().manual_seed(int(hparams.seed))
    patches = rt.patches
    blocks, w_zetas = [], []
    for l in layers:
        info = infos[l]
        dev = info.value.weight.device
        mu = archive.mu(l).to(dev)
        block = patches.add_block(l, int(hparams.num_neurons), tag=("unike", eid))
        rt.blocks[eid].append(block)
        k, b = _init_keys(shifted[l].to(dev), mu, int(hparams.num_neurons), float(hparams.key_noise), gen)
        with torch.no_grad():
            block.key.copy_(k)
            block.bias.copy_(b)
            if block.key_up is not None:
                block.key_up.copy_(k)
        if hparams.use_zeta and float(hparams.beta) != 0.0:
            w = nn.Parameter(archive.w_zeta(l).to(dev).clone())
            zeta = archive.zeta(l).to(dev)
            beta = float(hparams.beta)
            block.value_extra = (lambda w=w, zeta=zeta, beta=beta: beta * (w @ zeta))
            w_zetas.append(w)
        blocks.append(block)

    # 6. train with the shifts and earlier blocks active
    params = [p for blk in blocks for p in blk.parameters()] + w_zetas
    opt = torch.optim.Adam(params, lr=float(hparams.edit_lr))
    penalty_states = _penalty_states(archive, layers, infos) if hparams.memory_loss_weight > 0 else None
    with gate_open(model, GATE):
        for step in range(int(hparams.max_edit_steps) + 1):
            loss = adapter.loss(model, batch)
            value = float(loss.detach())
            if rep.first_loss is None:
                rep.first_loss = value
            rep.final_loss = value
            if value < float(hparams.stop_loss) or step == int(hparams.max_edit_steps):
                break
            total = loss
            if penalty_states is not None:
                pen = sum(blk.act(penalty_states[blk.layer]).abs().mean() for blk in blocks)
                total = total + float(hparams.memory_loss_weight) * pen
            opt.zero_grad()
            total.backward()
            torch.nn.utils.clip_grad_norm_(params, float(hparams.grad_clip))
            opt.step()
            rep.steps += 1

    # 7. fold β W_ζ ζ into the values, drop W_ζ, freeze
    with torch.no_grad():
        for blk in blocks:
            if blk.value_extra is not None:
                blk.value.add_(blk.value_extra().unsqueeze(1))
                blk.value_extra = None
            blk.freeze()
    rep.seconds = time.time() - t0
    return rep


def _penalty_states(archive: Archive, layers: list[int], infos: list[Any]) -> dict[int, torch.Tensor]:
    n = int(archive.payload["bank.h_sem"].shape[0])
    idx = torch.arange(min(n, MEMORY_PENALTY_SAMPLES))
    bank = archive.bank("h_sem", layers)[idx].float()
    return {l: bank[:, j].to(infos[l].value.weight.device) for j, l in enumerate(layers)}
