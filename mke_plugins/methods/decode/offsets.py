"""DECODE step 7 (README, "Algorithm"): learned offsets on the selected value columns, then folded in.

Each stage trains one fp32 offset row ``z_i`` per neuron of its group, applied by a forward hook
on the value module (``core.deltas.ColumnDelta``: ``out += a[..., idx] @ Z``, i.e. ``v_i ← v_i + z_i``
at every position), with loss ``CE(target + EOS) + kl_weight · KL(p_ref ‖ p_edit)`` on the prompt
positions and Adam; each step re-runs only the decoder layers from the group's lowest one up, and
in that one only what follows its value module (``core.replay``: same logits, less time). The
stage ends early, before any update, once the mean CE is below its threshold. The hooks are
removed in ``finally``; the offsets are then folded into the weights (the sum in fp32, one cast),
after the touched columns are snapshotted for an exact restore.

:func:`run_decode` is the whole algorithm over a list of requests (steps 1–8); it returns the
edited model, the weight snapshot and one :class:`EditReport` per request. The bench calls it
directly; ``decode_main`` wraps it in EasyEdit's apply signature.
"""

from __future__ import annotations

import contextlib
import functools
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Hashable, Iterator, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mke_plugins.adapters import LayerInfo, VLMAdapter, get_adapter
from mke_plugins.core.augment import NoisyCopies, noisy_copies
from mke_plugins.core.deltas import ColumnDelta, DeltaSet
from mke_plugins.core.finite import check_finite
from mke_plugins.core.hooks import HookSet
from mke_plugins.core.modes import frozen
from mke_plugins.core.replay import prefix_replay
from mke_plugins.core.routing import RoutedEdits, routed_edits
from mke_plugins.core.snapshot import WeightSnapshot

from .decode_hparams import DECODEHyperParams
from .localize import Localization, Neuron, StageInput, jaccard, kl_chunk, localize
from .routed import route_keys, routed_edit

# -- reports ------------------------------------------------------------------------------

@dataclass
class StageReport:
    name: str  # text | image | joint
    group_size: int
    steps: int = 0  # Adam updates taken
    final_l_tgt: float | None = None  # last mean CE computed
    final_l_loc: float | None = None  # last KL computed (None if the stage stopped before any)
    final_l_answer: float | None = None  # last mean CE over the answer tokens alone (end-of-answer token excluded)
    early_stopped: bool = False
    skipped: bool = False  # empty group
    seconds: float = 0.0


@dataclass
class EditReport:
    """What one request's edit did (README, "Algorithm", step 8)."""

    n_text: list[Neuron]
    n_image: list[Neuron]
    jaccard: float | None
    g_text_size: int
    g_image_size: int
    layers: list[int]
    stages: list[StageReport] = field(default_factory=list)
    localize_seconds: float = 0.0
    seconds: float = 0.0
    added_bytes: int = 0  # lifelong mode: the routed edit's keys and offsets

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def stats(self) -> dict[str, Any]:
        """Flat numbers and flags for the bench's per-case ``extra`` (averaged / counted per row)."""
        out: dict[str, Any] = {"n_text": len(self.n_text), "n_image": len(self.n_image),
                               "g_text": self.g_text_size, "g_image": self.g_image_size,
                               "localize_seconds": self.localize_seconds}
        if self.jaccard is not None:
            out["jaccard"] = self.jaccard
        for s in self.stages:
            if s.skipped:
                out[f"{s.name}_skipped"] = True
                continue
            out[f"steps_{s.name}"] = s.steps
            out[f"early_stop_{s.name}"] = s.early_stopped
            if s.final_l_tgt is not None:
                out[f"l_tgt_{s.name}"] = s.final_l_tgt
            if s.final_l_answer is not None:
                out[f"l_answer_{s.name}"] = s.final_l_answer
            if s.final_l_loc is not None:
                out[f"l_loc_{s.name}"] = s.final_l_loc
        return out


@dataclass
class DecodeResult:
    model: nn.Module
    snapshot: WeightSnapshot
    reports: list[EditReport]


# -- determinism ------------------------------------------------------------------------------

@contextlib.contextmanager
def seeded(model: nn.Module, seed: int) -> Iterator[None]:
    """Seed torch for the block without disturbing the caller's RNG streams."""
    cuda = sorted({p.device.index or 0 for p in model.parameters() if p.device.type == "cuda"})
    with torch.random.fork_rng(devices=cuda):
        torch.manual_seed(seed)
        yield


# -- losses ---------------------------------------------------------------------------------

def kl_loss(logits: torch.Tensor, stage: StageInput) -> torch.Tensor:
    """Mean over the KL positions of KL(p_ref ‖ p_edit), fp32, computed in position chunks."""
    ref = stage.ref_logprobs
    if ref is None or ref.shape[0] == 0:
        return logits.new_zeros((), dtype=torch.float32)
    sel = logits[stage.kl_pos.to(logits.device)]
    ref = ref.to(sel.device)
    total = sel.new_zeros((), dtype=torch.float32)
    step = kl_chunk(sel.shape[-1])
    for c in range(0, sel.shape[0], step):
        lp_ref = ref[c:c + step].float()
        lp = F.log_softmax(sel[c:c + step].float(), dim=-1)
        total = total + (lp_ref.exp() * (lp_ref - lp)).sum()
    return total / sel.shape[0]


def answer_ce(logits: torch.Tensor, stage: StageInput) -> float:
    """Mean CE over the answer tokens y_1..y_m alone (no end-of-answer token), fp32, without a graph."""
    with torch.no_grad():
        pos = stage.answer_pos[0].nonzero().flatten().to(logits.device)
        labels = stage.batch.labels[0].to(logits.device)[pos + 1]
        return float(F.cross_entropy(logits[0, pos].float(), labels))


# -- step 7: one stage --------------------------------------------------------------------------

def by_layer(group: Sequence[Neuron]) -> dict[int, list[int]]:
    out: dict[int, list[int]] = {}
    for layer, idx in sorted(group):
        out.setdefault(layer, []).append(idx)
    return out


def make_deltas(infos: Sequence[LayerInfo], group: Sequence[Neuron]) -> DeltaSet:
    """Zero-initialised fp32 offsets, one ``ColumnDelta`` per touched layer (on its device)."""
    return DeltaSet(ColumnDelta(infos[layer].value, cols) for layer, cols in by_layer(group).items())


#: what to change when a stage's loss is no longer finite
FIX = "lower `lr` or `kl_weight`, or load the model in float32."


def train_stage(adapter: VLMAdapter, model: nn.Module, stage: StageInput, group: Sequence[Neuron],
                infos: Sequence[LayerInfo], threshold: float, hparams: DECODEHyperParams,
                snapshot: WeightSnapshot, name: str,
                kept: list[tuple[list[int], DeltaSet]] | None = None,
                copies: NoisyCopies | None = None) -> StageReport:
    """Optimise the group's offsets on the stage batch, then fold them (README, "Algorithm", step 7).

    ``kept`` (lifelong mode, :mod:`.routed`): instead of folding, append ``(layers, offsets)`` to it;
    the caller keeps them applied by hook for the edit's later stages. ``copies`` (``fit_copies``):
    the target CE is taken over the clean row and its noisy copies; the KL, the early-stop CE and the
    report read the clean row alone.
    """
    report = StageReport(name, len(group))
    if not group:
        report.skipped = True
        return report
    t0 = time.perf_counter()
    deltas = make_deltas(infos, group)
    opt = torch.optim.Adam(list(deltas.parameters()), lr=hparams.lr)
    start = min(layer for layer, _ in group) if hparams.prefix_replay and copies is None else None
    inside = infos[start].value if start is not None else None
    batch = copies.batch if copies is not None else stage.batch
    try:
        deltas.install()
        # nothing below the group's lowest layer changes, nor its part before the value module: each step
        # re-runs only the layers from there up, serving that part from the first pass
        with torch.enable_grad(), prefix_replay(adapter, model, start, inside=inside) as replayed, \
                HookSet() as hooks:
            if copies is not None:
                hooks.add(copies.point, copies.add_noise)
            for _ in range(hparams.max_steps):
                logits = replayed.forward(model, batch)
                l_tgt = adapter.loss(model, batch, logits=logits)
                clean = logits[:1]
                report.final_l_tgt = float(l_tgt.detach()) if copies is None else \
                    float(adapter.loss(model, stage.batch, logits=clean.detach()))
                report.final_l_answer = answer_ce(clean, stage)
                watched = report.final_l_tgt if hparams.early_stop_on == "answer_eos" else report.final_l_answer
                if watched < threshold:
                    report.early_stopped = True
                    break
                l_loc = kl_loss(clean, stage)
                report.final_l_loc = float(l_loc.detach())
                loss = l_tgt + hparams.kl_weight * l_loc
                check_finite(f"DECODE ({name} stage)", report.steps + 1, l_tgt=l_tgt, l_loc=l_loc, loss=loss,
                             fix=FIX)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                report.steps += 1
                del logits, clean, loss, l_tgt, l_loc
    finally:
        deltas.remove()
    if report.steps and kept is not None:
        for z in deltas.parameters():
            z.requires_grad_(False)
        kept.append((sorted(by_layer(group)), deltas))
    elif report.steps:  # an early stop before any update leaves the weights untouched
        deltas.fold(model, snapshot)
    report.seconds = time.perf_counter() - t0
    return report


STAGE_THRESHOLDS = {"text": "early_stop_text", "image": "early_stop_image", "joint": "early_stop_joint"}
#: offsets of each stage's noise seed from ``hparams.seed`` (``fit_copies``)
STAGE_SEEDS = {"text": 1, "image": 2, "joint": 3}


def plan_stages(loc: Localization, hparams: DECODEHyperParams) -> list[tuple[str, StageInput | None, list[Neuron]]]:
    """``stage_order`` → [(name, stage input, group)]; stages without input or group are skipped later."""
    text = ("text", loc.text, loc.g_text)
    image = ("image", loc.image, loc.g_image)
    if hparams.stage_order == "joint":
        joint_group = sorted(set(loc.g_text) | set(loc.g_image))
        return [("joint", loc.paired, joint_group)]
    return [text, image] if hparams.stage_order == "text_first" else [image, text]


# -- steps 1–8 for a list of requests ------------------------------------------------------------

def edit_request(adapter: VLMAdapter, model: nn.Module, tok: Any, request: dict[str, Any],
                 hparams: DECODEHyperParams, snapshot: WeightSnapshot,
                 infos: list[LayerInfo] | None = None, store: RoutedEdits | None = None,
                 tag: Hashable = None) -> EditReport:
    """One edit: localise on the model as it is, then run the stages and fold each (``store``: keep
    them apart and add them to the routed edits as ``tag`` instead, :mod:`.routed`)."""
    t0 = time.perf_counter()
    infos = infos if infos is not None else adapter.layers(model)
    keys, admitted = route_keys(adapter, model, tok, request, store) if store is not None else (None, None)
    kept: list[tuple[list[int], DeltaSet]] | None = [] if store is not None else None
    with contextlib.ExitStack() as routed:
        # earlier routed edits this fact's queries reach stay in force throughout; with exclusive routing its
        # own queries will meet only this edit (their own keys are the closest), so it trains on the bare model
        if admitted is not None and not hparams.route_exclusive:
            routed.enter_context(store.routed(admitted))
        report = _localize_and_train(adapter, model, tok, request, hparams, snapshot, infos, kept, t0)
    if store is not None and kept:
        edit = routed_edit(tag, keys, float(hparams.route_threshold), kept, hparams.route_exclusive)
        store.add(edit)
        report.added_bytes = edit.nbytes
    report.seconds = time.perf_counter() - t0
    return report


def _localize_and_train(adapter: VLMAdapter, model: nn.Module, tok: Any, request: dict[str, Any],
                        hparams: DECODEHyperParams, snapshot: WeightSnapshot, infos: list[LayerInfo],
                        kept: list[tuple[list[int], DeltaSet]] | None, t0: float) -> EditReport:
    """Steps 1–7 of one request (``kept``: lifelong mode, the stages' offsets collected, not folded)."""
    loc = localize(adapter, model, tok, request, hparams, infos)
    t_loc = time.perf_counter() - t0
    report = EditReport(n_text=sorted(loc.n_text), n_image=sorted(loc.n_image),
                        jaccard=jaccard(loc.n_text, loc.n_image) if loc.image is not None else None,
                        g_text_size=len(loc.g_text), g_image_size=len(loc.g_image), layers=loc.layers,
                        localize_seconds=t_loc)
    for name, stage, group in plan_stages(loc, hparams):
        if stage is None:
            report.stages.append(StageReport(name, 0, skipped=True))
            continue
        threshold = getattr(hparams, STAGE_THRESHOLDS[name])
        if kept:  # the edit's earlier stages stay applied while this one trains
            for _, deltas in kept:
                deltas.install()
        copies = noisy_copies(adapter, model, tok, stage.batch, copies=hparams.fit_copies, noise=hparams.fit_noise,
                              seed=hparams.seed + STAGE_SEEDS[name], append_eos=stage.appends_eos) if group else None
        try:
            report.stages.append(train_stage(adapter, model, stage, group, infos, threshold, hparams, snapshot,
                                             name, kept=kept, copies=copies))
        finally:
            for _, deltas in kept or ():
                deltas.remove()
    return report


def run_decode(model: nn.Module, tok: Any, requests: Sequence[dict[str, Any]], hparams: DECODEHyperParams,
               *, adapter: VLMAdapter | None = None, snapshot: WeightSnapshot | None = None,
               undo: Callable[[Callable[[], Any]], Any] | None = None) -> DecodeResult:
    """DECODE over ``requests`` in order (each its own edit), folding into ``model`` in place.

    Requests must already be validated (``decode_main`` does it). ``snapshot`` receives the
    original bits of every column this call changes (the earliest copy wins on restore). In
    lifelong mode (``route_threshold``) nothing is folded: each edit joins the model's routed edits,
    and ``undo`` receives, before the edit starts, the callable that removes it.
    """
    adapter = adapter or get_adapter(model, hparams)
    snapshot = snapshot if snapshot is not None else WeightSnapshot(model)
    store = None
    if hparams.route_threshold is not None:
        store = routed_edits(model, adapter, route_layer=int(hparams.route_layer), window=int(hparams.route_window))
    reports = []
    with frozen(model), seeded(model, hparams.seed):  # eval mode, every parameter frozen, flags put back
        infos = adapter.layers(model)
        for request in requests:
            tag = None
            if store is not None:
                tag = object()
                if undo is not None:
                    undo(functools.partial(store.remove, tag))
            reports.append(edit_request(adapter, model, tok, request, hparams, snapshot, infos, store, tag))
    return DecodeResult(model, snapshot, reports)
