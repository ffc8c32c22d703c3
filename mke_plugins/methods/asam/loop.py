"""ASAM's optimisation (README, "Algorithm" 4): the full loss, the outer loop and the stop rule, per edit.

    L = NLL(y_e | x_e) + λ_adv·mean_k NLL(y_e | z+δ*_k) + λ_rcsl·L_RCSL + λ_act·L_act + λ_mem·L_mem

One outer step: regenerate the K variants with PGD when due (patch frozen, δ* detached), run
one forward over the K+1 rows [z; z+δ*_1; …; z+δ*_K] with the gate open, capturing the
edited layers' FFN inputs (for L_act) and outputs at the last prompt position (for RCSL), check
the stop rule on that forward, then one Adam step on the current edit's patch parameters only
(gradient clipped). With ``lar_regen_every`` N > 1 a variant set serves N steps; a stop rule met on
a reused set is confirmed on a fresh one first (``lar_fresh_stop``: the next step regenerates and
checks again, with no update in between). With ``lar: false`` there are no variants (K = 0) and the same code is the
base neuron-patch editor: anchor-only NLL, activation loss and stopping, the same memory loss.

:func:`run_asam` edits a list of requests in turn; every finished edit freezes its blocks and
appends its anchor's FFN-input states (unpatched model) to the memory bank, so later edits learn
to stay silent on it (not with ``lambda_mem: 0``, where no memory loss would read them).
"""

from __future__ import annotations

import contextlib
import functools
import time
import zlib
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Sequence

import torch
from torch import nn

from mke_plugins.adapters import HookPoint, Query, VLMAdapter, resolve_layers
from mke_plugins.core.finite import check_finite
from mke_plugins.core.hooks import capture
from mke_plugins.core.modes import frozen
from mke_plugins.core.replay import prefix_replay
from mke_plugins.core.scope import InputScope
from mke_plugins.core.wrap import gate_open

from . import lar as lar_mod
from .asam_hparams import ASAMHyperParams
from .memory import bank_dtypes, ffn_states, get_bank
from .patch import (
    GATE,
    ASAMState,
    activation_loss,
    init_keys_anchor,
    init_keys_unit,
    memory_loss,
    new_blocks,
    state_for,
    undo_edit,
)
from .rcsl import rcsl_loss


@dataclass
class EditStats:
    """What one edit did (JSON-serialisable; the bench shows it under ``extra``)."""

    steps: int = 0  # Adam updates taken
    stopped: bool = False  # the stop rule was met (else max_steps ran out)
    seconds: float = 0.0
    lar_seconds: float = 0.0  # time spent generating variants
    regenerations: int = 0  # variant sets generated (one PGD run each)
    layers: list[int] = field(default_factory=list)
    variants: int = 0
    nll: float | None = None  # loss terms at the last forward
    adv: float | None = None
    rcsl: float | None = None
    act: float | None = None
    mem: float | None = None
    rows_correct: float | None = None  # share of the K+1 rows argmax-correct at the last forward
    coherence_first: float | None = None
    coherence_last: float | None = None
    image_as_text: bool | None = None
    svd_fallbacks: int = 0
    memory_states: int = 0
    memory_source: str = ""
    memory_seconds: float = 0.0  # fetching (or building, memory_source "built") the bank at the apply's start

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class ASAMResult:
    model: nn.Module
    tags: list[Hashable]
    stats: list[EditStats]


def edit_generator(hparams: ASAMHyperParams, query: Query) -> torch.Generator:
    """A CPU generator seeded by ``seed`` and the edit's text, so each edit has its own reproducible draws."""
    salt = zlib.crc32(f"{query.prompt}\x00{query.target}".encode())
    return torch.Generator().manual_seed((int(hparams.seed) * 1_000_003 + salt) % (2 ** 63))


def _finite(value: torch.Tensor, term: str, step: int) -> None:
    check_finite("ASAM", step, where="outer step", **{term: value},
                 fix="lower `lr`, `lar_eps` or the weight of that term (lambda_*), or use dtype float32.")


def _cat_rows(bank: torch.Tensor | None, extra: list[torch.Tensor]) -> torch.Tensor | None:
    parts = ([bank] if bank is not None else []) + [e.to(bank.dtype if bank is not None else e.dtype) for e in extra]
    return torch.cat(parts, dim=0) if parts else None


def edit_one(model: nn.Module, tok: Any, adapter: VLMAdapter, query: Query, hparams: ASAMHyperParams,
             state: ASAMState, layers: Sequence[int], memory: dict[int, torch.Tensor | None], tag: Hashable
             ) -> EditStats:
    """Train one edit's patch (blocks tagged ``tag``); the caller undoes the tag if this raises."""
    t_start = time.perf_counter()
    stats = EditStats(layers=list(layers))
    gen = edit_generator(hparams, query)
    infos = adapter.layers(model)
    K = hparams.n_variants
    stats.variants = K
    batch1 = adapter.batch(model, tok, [query])
    T = int(batch1.labels.shape[1])
    p = lar_mod.first_answer_position(batch1)
    ans = torch.tensor(batch1.answer_positions()[0], device=batch1.labels.device)
    blocks = new_blocks(state, layers, int(hparams.n_neurons), tag)
    ffn_points = {layer: infos[layer].ffn_in for layer in layers}
    out_points = {layer: HookPoint(infos[layer].layer, "output") for layer in layers}
    embed_point = adapter.embed_output(model)

    # anchor FFN inputs at the answer-predicting positions (new blocks have V = 0: the model is as before)
    with torch.no_grad(), gate_open(model, GATE), capture(ffn_points, positions=batch1.answer_mask) as rec:
        logits1 = adapter.forward(model, batch1)
    anchor_q = {layer: rec[layer] for layer in layers}
    if hparams.key_init == "anchor" or K == 0:
        for layer in layers:
            (init_keys_anchor if hparams.key_init == "anchor" else init_keys_unit)(blocks[layer], anchor_q[layer], gen)

    if K > 0:
        batch_k = adapter.batch(model, tok, [query] * K)
        batch_main = adapter.batch(model, tok, [query] * (K + 1))
        if int(batch_k.labels.shape[1]) != T or int(batch_main.labels.shape[1]) != T:
            raise RuntimeError("ASAM: repeated anchor rows changed length; the adapter must build identical rows")
        anchor = lar_mod.anchor_info(model, adapter, batch1, hparams.lar_masks)
        stats.image_as_text = anchor.image_as_text
        with torch.no_grad():
            clean_logits = adapter.forward(model, batch1)  # gate closed: the unedited model
        clean_top1 = int(clean_logits[0, p].argmax())
        old_labels = None
        if hparams.lar_objective == "targeted":
            old_labels = lar_mod.pre_edit_labels(clean_logits, batch1).expand(K, -1).contiguous()
    else:
        batch_main = batch1
    del logits1

    params = [prm for b in blocks.values() for prm in b.parameters()]
    opt = torch.optim.Adam(params, lr=float(hparams.lr))
    delta_full: torch.Tensor | None = None
    delta: torch.Tensor | None = None
    stale_stop = False  # the stop rule held on variants made for an earlier patch: regenerate, check again
    # the variants enter at layer 0's input and the patches sit in decoder layers: each pass re-runs only the
    # decoder layers, from what the first full forward of its batch handed to layer 0 (core.replay)
    with prefix_replay(adapter, model, 0 if hparams.prefix_replay else None) as replayed:
        for step in range(1, int(hparams.max_steps) + 1):
            fresh = K > 0 and ((step - 1) % int(hparams.lar_regen_every) == 0 or stale_stop)
            stale_stop = False
            if fresh:
                stats.regenerations += 1
                t0 = time.perf_counter()
                delta = lar_mod.pgd(model, replayed, batch_k, anchor, rho=float(hparams.lar_eps),
                                    steps=int(hparams.lar_steps), alpha=hparams.step_size(), gen=gen, gate=GATE,
                                    objective=hparams.lar_objective, old_labels=old_labels, mode=hparams.lar_mode)
                stats.lar_seconds += time.perf_counter() - t0
                if stats.coherence_first is None:
                    stats.coherence_first = lar_mod.coherence(model, adapter, batch_k, delta, clean_top1, p)
                delta_full = torch.cat([delta.new_zeros((1, *delta.shape[1:])), delta], dim=0)
                if step == 1 and hparams.key_init == "unit":
                    with torch.no_grad(), gate_open(model, GATE), lar_mod.perturbed(embed_point, delta_full), \
                            capture(ffn_points, positions=batch_main.answer_mask) as rec_u:
                        adapter.forward(model, batch_main)
                    for layer in layers:
                        init_keys_unit(blocks[layer], rec_u[layer], gen)

            perturb = lar_mod.perturbed(embed_point, delta_full) if K > 0 else contextlib.nullcontext()
            with gate_open(model, GATE), perturb, \
                    capture(ffn_points, detach=False, seq_shape=(K + 1, T)) as rq, \
                    capture(out_points, detach=False) as ro:
                answers = replayed.answer_logits(model, batch_main)
            rows_nll = answers.loss("row")
            nll = rows_nll[0]
            _finite(nll, "nll", step)
            total = nll
            stats.nll = float(nll.detach())
            if K > 0:
                adv = rows_nll[1:].mean()
                _finite(adv, "adv", step)
                total = total + float(hparams.lambda_adv) * adv
                stats.adv = float(adv.detach())
            act_terms, act_anchor_terms, rcsl_terms, mem_terms = [], [], [], []
            for layer in layers:
                q = rq[layer][:, ans]  # (K+1, |ans|, d)
                act_terms.append(activation_loss(blocks[layer], q, float(hparams.act_margin)))
                act_anchor_terms.append(activation_loss(blocks[layer], q[:1], float(hparams.act_margin)))
                if K > 0 and hparams.rcsl:
                    r = ro[layer][:, p]
                    term, fell_back = rcsl_loss(r, rank=int(hparams.rcsl_rank), form=hparams.rcsl_form,
                                                asym=bool(hparams.asym))
                    stats.svd_fallbacks += int(fell_back)
                    rcsl_terms.append(term)
                if float(hparams.lambda_mem) > 0 and memory.get(layer) is not None:
                    mem_terms.append(memory_loss(blocks[layer], memory[layer], float(hparams.mem_margin),
                                                 int(hparams.memory_top)))
            dev = nll.device  # per-layer terms live beside their layers (a model spread over several GPUs)
            act = torch.stack([t.to(dev) for t in act_terms]).mean()
            act_anchor = torch.stack([t.to(dev) for t in act_anchor_terms]).mean()
            _finite(act, "act", step)
            total = total + float(hparams.lambda_act) * act
            stats.act = float(act.detach())
            if rcsl_terms:
                rc = torch.stack([t.to(dev) for t in rcsl_terms]).mean()
                _finite(rc, "rcsl", step)
                total = total + float(hparams.lambda_rcsl) * rc
                stats.rcsl = float(rc.detach())
            if mem_terms:
                mem = torch.stack([t.to(dev) for t in mem_terms]).mean()
                _finite(mem, "mem", step)
                total = total + float(hparams.lambda_mem) * mem
                stats.mem = float(mem.detach())
            with torch.no_grad():
                ok_rows = answers.success()
            stats.rows_correct = float(ok_rows.float().mean())
            if hparams.stop_on == "unit":
                done = bool(ok_rows.all()) and float(act.detach()) <= float(hparams.act_tol)
            else:
                done = bool(ok_rows[0]) and float(act_anchor.detach()) <= float(hparams.act_tol)
            if done and K > 0 and not fresh and hparams.lar_fresh_stop:
                stale_stop = True  # no update: the next outer step regenerates the variants and checks again
                continue
            if done:
                stats.stopped = True
                break
            opt.zero_grad(set_to_none=True)
            total.backward()
            if float(hparams.grad_clip) > 0:
                torch.nn.utils.clip_grad_norm_(params, float(hparams.grad_clip))
            opt.step()
            stats.steps += 1
            del answers, rows_nll, total
    if K > 0 and delta is not None:
        stats.coherence_last = lar_mod.coherence(model, adapter, batch_k, delta, clean_top1, p)
    for layer, b in blocks.items():
        b.freeze()
        if hparams.scope_threshold is not None:  # lifelong mode: the finished edit acts only near its anchor
            b.scope = InputScope.around(anchor_q[layer], float(hparams.scope_threshold), hparams.scope_exclusive)
    stats.seconds = time.perf_counter() - t_start
    return stats


def run_asam(model: nn.Module, tok: Any, requests: Sequence[dict[str, Any]], hparams: ASAMHyperParams,
             adapter: VLMAdapter, undo: Callable[[Callable[[], Any]], Any]) -> ASAMResult:
    """Edit ``requests`` in turn on ``model`` (the bare base model); patches accumulate.

    Before each edit starts, ``undo`` receives the callable that removes it (its blocks and bank
    rows, a half-made edit's too): the caller runs them, latest first, to restore or when this raises.
    """
    layers = resolve_layers(hparams.edit_layers, len(adapter.layers(model)), key="edit_layers")
    tags: list[Hashable] = []
    all_stats: list[EditStats] = []
    with frozen(model):
        bank: dict[int, torch.Tensor] = {}
        source, n_bank, bank_seconds = "off", 0, 0.0
        if float(hparams.lambda_mem) > 0:
            t_bank = time.perf_counter()
            bank, _, source = get_bank(model, tok, adapter, hparams, layers)
            bank_seconds = time.perf_counter() - t_bank
        for req in requests:
            state = state_for(model, adapter)
            query = Query(req["image"], req["prompt"], req["target"])
            memory = {layer: _cat_rows(bank.get(layer), state.extra(layer)) for layer in layers} if bank else {}
            n_bank = int(next(iter(memory.values())).shape[0]) if memory else 0
            tag = state.new_tag()
            undo(functools.partial(undo_edit, model, tag))
            stats = edit_one(model, tok, adapter, query, hparams, state, layers, memory, tag)
            if float(hparams.lambda_mem) > 0:  # with no memory loss the rows would never be read
                rows = ffn_states(model, tok, adapter, [query], layers, positions=hparams.memory_positions,
                                  seed=int(hparams.seed), dtype=bank_dtypes(model, adapter, layers))
                state.extra_rows.append((tag, rows))
            stats.memory_states, stats.memory_source, stats.memory_seconds = n_bank, source, bank_seconds
            tags.append(tag)
            all_stats.append(stats)
    return ASAMResult(model, tags, all_stats)


def describe(stats: EditStats) -> str:
    parts = [f"{stats.steps} steps", "stopped" if stats.stopped else "max_steps reached",
             f"{stats.seconds:.2f}s"]
    if stats.variants:
        parts.append(f"coherence {stats.coherence_first}->{stats.coherence_last}")
        if stats.rcsl is not None:
            parts.append(f"L_rcsl {stats.rcsl:.3g}")
    return ", ".join(parts)

