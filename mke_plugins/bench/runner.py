"""Run methods on edit cases and score them: the single-edit and sequential protocols.

Single mode (per case): build the case's probe batches once, evaluate them on the unedited model
(pre), time the forward+backward unit (the median of warmed passes,
:func:`.cost.fwd_bwd_seconds`), apply the edit through the method's EasyEdit-facing apply (a
list of one request), evaluate the same batches on the returned model (post), greedy-decode the
paired query, undo the edit the way EasyEdit main does and check that the model is bit-identical
to its state at the start (``verify_restore``; a failure names the method). Cases are the outer
loop and methods the inner one, so every method sees the same machine load and the pre-edit
outputs are computed once per case.

Sequential mode (per method, per sequence of ``sequential_n`` cases, each sequence one unit of
work, never split): before anything is edited, every sequence's probes are planned
(:mod:`.collisions`: a T-Loc / M-Loc probe whose fact the sequence edits is left out of locality; fine-locality
and portability probes whose fact another edit of the sequence changes become cross-edit
consistency probes). Then pre for every case of the sequence on the unedited model (cached, as
in single mode), and the edits accumulate (EasyEdit's way: each apply gets the model, the last
returned model is evaluated). After the ``T``-th edit, for each checkpoint ``T`` (``checkpoints``;
always the end of the sequence), every edit made so far is evaluated on the current model with
its probe batches, built once per case and kept (up to ``keep_batches_mb`` per sequence, then
built again at each checkpoint); the evaluation after the last edit gives the method row
(and greedy decoding), all of them the ``curve`` (:mod:`.curve`). Then the edits are undone in
reverse order and the model is checked.

Units of work, processes and restarts: a unit is one case with every method (single mode) or one
method's whole sequence (sequential mode). Under ``torchrun`` / ``accelerate launch`` each rank
takes every ``WORLD_SIZE``-th unit still to do (:mod:`.dist`); every finished unit goes to the
rank's JSONL beside ``--json`` (:mod:`.resume`), passed through JSON like the journal holds it,
and rank 0 merges the units in case order, so one process, several ranks and a resumed run give
the same quality columns. Seeds come from the case index, never from the rank.

Per-edit stats come in one shape: the :class:`~mke_plugins.core.template.ApplyStats` the method
template puts on ``weights_copy.stats`` (one ``EditStats`` per request: steps, seconds, converged,
added_bytes and the method's own values). They appear per case under ``extra`` and, aggregated,
in the method row; a method that does not use the template reports none.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Sequence

import numpy as np
import torch

from mke_hooks import MKEError
from mke_plugins.adapters.loading import load_vlm, seed_all
from mke_plugins.adapters.placement import model_devices

from . import DEFAULT_CASES
from .checks import check_config
from .collisions import SequencePlan, cross_edit_scores, plan_notes, plan_sequence
from .cost import PeakMemory, fwd_bwd_seconds, sync
from .curve import Checkpoint, curve, curve_ts
from .data import check_text, load_data, with_images
from .dist import SharedCount, start
from .methods import BoundMethod, MethodRequest, bind, bind_rows
from .probes import GENERALITY_KINDS, ProbeBatches, ProbeOutput, build_batches, case_probes, run_probes, understood
from .restore import StateCheck, restore_like_easyedit
from .resume import Journal, ctrl_c_after, data_digest, unit_key
from .score import AT_EDIT_KEYS, SCHEMA_KEYS, aggregate, score_case

log = logging.getLogger(__name__)



@dataclass
class BenchConfig:
    """Everything a bench run depends on (the CLI fills it; tests build it directly)."""

    methods: list[MethodRequest] | None = None  # None: every registered method with a YAML for `hparams`
    cases: int | None = DEFAULT_CASES  # first N records (None: all)
    mode: str = "single"
    sequential_n: int | None = None  # sequential mode: edits per sequence (None: all cases at once)
    data: str | None = None  # benchmark JSON or folder (None: the bundled world's edit split)
    image_root: str | None = None  # None: with no root flag the hparams' coco_image (EasyEdit formats), else JSON's
    rephrase_image_root: str | None = None  # None: with no root flag the hparams' rephrase_image, else the image root
    format: str = "auto"  # one of mke_plugins.bench.formats.FORMAT_CHOICES
    model: str | None = None  # model directory (None: the bundled model of `world`)
    world: str = "single"  # bundled world layout behind the default data and model: single or lifelong
    hparams: str = "world"  # bundled YAML key of each method
    seed: int | None = None  # None: global RNG seeded with 0, methods keep their YAML seed
    device: str = "cpu"
    dtype: str = "float32"
    device_map: str | None = None  # "auto": spread the model over this node's GPUs (from_pretrained's device_map)
    max_memory: Any = None  # per-device caps with device_map: {0: "20GiB", "cpu": "60GiB"} or the --max-memory text
    verify_restore: bool = True
    generate: bool = True
    keep_cases: bool = False
    checkpoints: list[int] | None = None  # sequential mode: also evaluate after these many edits (None: the end only)
    # sequential mode: probe batches (pixel values included) kept from the pre pass to the checkpoints, up to
    # this many MB per sequence; the cases beyond it are batched again at each checkpoint (same tensors)
    keep_batches_mb: float = 2048.0
    probe_batch: int = 64
    easyedit_hparams: dict[str, str] = field(default_factory=dict)
    progress: bool = True
    threads: int | None = None  # CPU threads for torch; None: 1 for small models on CPU, else torch's default
    journal: str | None = None  # the --json path: each rank appends its finished units to <journal>.rank<R>.jsonl
    resume: bool = False  # skip the units the journal files already hold (same run, checked)


#: models below this many parameters run single-threaded on CPU by default: their kernels are too
#: small to gain from threads, and on a shared machine extra threads only wait for each other
SMALL_MODEL_PARAMS = 50_000_000


def load_model(path: str | None, device: str, dtype: str, device_map: str | None = None,
               max_memory: Any = None, layout: str = "single") -> tuple[Any, Any, str]:
    """``(model, processor, path)``: the VLM saved in ``path`` (None: the bundled model of the world
    ``layout``)."""
    from mke_plugins import world

    folder = str(world.model_path(layout)) if path is None else path
    model, tok = load_vlm(folder, device, dtype, device_map=device_map, max_memory=max_memory)
    return model, tok, str(Path(folder))


def method_extra(weights_copy: Any) -> dict[str, Any]:
    """The per-edit stats of one apply (``weights_copy.stats``, an ``ApplyStats``), flat; ``{}`` when absent."""
    from mke_plugins.core.template import ApplyStats

    stats = getattr(weights_copy, "stats", None)
    return _jsonable(stats.flat()) if isinstance(stats, ApplyStats) else {}


def hparams_json(hparams: Any) -> dict[str, Any]:
    """A method's hyperparameters as JSON values (ours by ``to_dict``, EasyEdit's by their fields)."""
    return _jsonable(hparams.to_dict() if hasattr(hparams, "to_dict") else vars(hparams))


def _added_bytes(extra: dict[str, Any]) -> float | None:
    """An edit's ``added_bytes`` from its stats (``None``: the method reports none)."""
    value = extra.get("added_bytes")
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _plain(obj: Any) -> Any:
    """``obj`` as it reads back from the journal: JSON values only, non-finite floats as ``None``."""
    from .report import finite_json

    return json.loads(json.dumps(finite_json(_jsonable(obj)), allow_nan=False))


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if torch.is_tensor(obj):
        return _jsonable(obj.tolist()) if obj.numel() > 1 else _jsonable(obj.item())
    if isinstance(obj, (np.generic,)):
        return obj.item()
    if isinstance(obj, float) and obj != obj:
        return None
    if obj is None or isinstance(obj, (str, int, float, bool)):
        return obj
    return str(obj)


class Bench:
    """One configured run: the model, the cases and the bound methods."""

    def __init__(self, cfg: BenchConfig) -> None:
        from mke_plugins.adapters import get_adapter

        if cfg.mode not in ("single", "sequential"):
            raise MKEError(f"--mode must be single or sequential, got {cfg.mode!r}")
        if cfg.sequential_n is not None and cfg.sequential_n < 1:
            raise MKEError(f"--sequential-n must be at least 1, got {cfg.sequential_n}")
        if cfg.checkpoints is not None:
            if cfg.mode != "sequential":
                raise MKEError("--checkpoints needs --mode sequential (single edits have no T)")
            if not cfg.checkpoints or any(isinstance(t, bool) or not isinstance(t, int) or t < 1
                                          for t in cfg.checkpoints):
                raise MKEError(f"--checkpoints must be edit counts of at least 1 (e.g. 1,10,100), got "
                               f"{cfg.checkpoints}")
        check_config(cfg)
        if cfg.resume and not cfg.journal:
            raise MKEError("--resume needs --json: the finished units are kept beside the result JSON")
        self.ranks = start(cfg.device, cfg.device_map)  # under torchrun: this rank's device
        cfg = replace(cfg, device=self.ranks.device)
        self.cfg = cfg
        data = cfg.data
        if data is None:
            from mke_plugins import world

            data = str(world.data_dir(layout=cfg.world))
        self.model_path = None if cfg.model is None else str(Path(cfg.model))
        # hparams and overrides are checked before the model loads (minutes at 7B)
        self.methods, bind_notes = bind_rows(cfg.methods or self.default_methods(cfg.hparams), self._bind)
        if not self.methods:
            raise MKEError("; ".join(bind_notes) or "no methods to run: nothing is registered with hyperparameters "
                           f"for {cfg.hparams!r}; see `mke-plugins methods`")
        self.probe_batch = min([cfg.probe_batch] + [m.probe_rows for m in self.methods if m.probe_rows])
        self.dataset = load_data(data, cases=cfg.cases, image_root=cfg.image_root, fmt=cfg.format,
                                 rephrase_image_root=cfg.rephrase_image_root, hparams=[m.hparams for m in self.methods])
        self.data_path, raw = self.dataset.path, self.dataset.requests
        self.model, self.tok, self.model_path = load_model(cfg.model, cfg.device, cfg.dtype,
                                                           cfg.device_map, cfg.max_memory, cfg.world)
        self.threads = cfg.threads
        if self.threads is None and cfg.device == "cpu" and \
                sum(p.numel() for p in self.model.parameters()) < SMALL_MODEL_PARAMS:
            self.threads = 1
        self.adapter = get_adapter(self.model, SimpleNamespace(model_name=self.model_path))
        self.requests = with_images(raw, self.adapter, self.dataset)  # every picture, before the first edit
        check_text(self.requests, self.tok, self.model, self.data_path, self.dataset)
        self._pre: dict[int, list[ProbeOutput]] = {}
        self._understood: dict[int, dict[str, bool]] = {}  # per case, read on the unedited model
        self._check: StateCheck | None = None
        self.notes: list[str] = list(self.dataset.notes) + bind_notes
        self.plans: list[SequencePlan] = []
        self.curves: dict[str, list[Checkpoint]] = {}
        self.interrupted: dict[str, int] | None = None  # set when Ctrl-C ended a journaled run early
        if cfg.mode == "sequential":  # a touched T-Loc / M-Loc probe stops the run here, before any edit
            self.plans = [plan_sequence(self.requests, chunk) for chunk in self.chunks()]
            self.notes.extend(plan_notes(self.plans))
            longest = max(len(c) for c in self.chunks())
            beyond = sorted(t for t in cfg.checkpoints or () if t > longest)
            if beyond:
                self.notes.append(f"checkpoints {', '.join(map(str, beyond))} lie beyond the longest sequence "
                                  f"({longest} edits): not evaluated")

    @staticmethod
    def default_methods(hparams_key: str) -> list[MethodRequest]:
        """Every registered method that ships a YAML for ``hparams_key``."""
        from mke_plugins.registry import get_registry

        return [MethodRequest(e.name, e.name) for e in get_registry() if hparams_key in e.hparams_models()]

    def _bind(self, req: MethodRequest) -> BoundMethod:
        common: dict[str, Any] = {"device": self.cfg.device, "dtype": self.cfg.dtype}
        if self.cfg.model is not None:
            common.update(model_name=self.model_path, name=self.model_path)
        if self.cfg.seed is not None:
            common["seed"] = self.cfg.seed
        return bind(req, hparams_key=self.cfg.hparams, common=common, easyedit_yaml=self.cfg.easyedit_hparams)

    # -- pieces --------------------------------------------------------------------------
    def _state_check(self) -> StateCheck | None:
        """The reference state, recorded once, after the first forward and backward passes.

        Some transformers versions install output-capturing hooks on a model's first forward; the
        record is taken after the unedited model has run, so only the edits are compared.
        """
        if self.cfg.verify_restore and self._check is None:
            self._check = StateCheck(self.model)
        return self._check

    def _batches(self, request: dict[str, Any]) -> tuple[ProbeBatches, Any]:
        probes = case_probes(request)
        pb = build_batches(self.adapter, self.model, self.tok, probes, self.probe_batch)
        edit_batch = self.adapter.batch(self.model, self.tok, [probes[0].query])
        return pb, edit_batch

    def _pre_outputs(self, index: int, pb: ProbeBatches) -> list[ProbeOutput]:
        if index not in self._pre:
            self._pre[index] = run_probes(self.adapter, self.model, pb)
            if index not in self._understood:
                self._understood[index] = understood(self.adapter, self.model, self.tok, self.requests[index],
                                                     self.probe_batch)
        return self._pre[index]

    def _apply(self, m: BoundMethod, request: dict[str, Any], seed: int) -> tuple[Any, Any, float, PeakMemory]:
        seed_all(seed)
        device = model_devices(self.model)  # every GPU of a spread model
        with PeakMemory(device) as mem:
            sync(device)
            t0 = time.perf_counter()
            out = m.apply(self.model, self.tok, [dict(request)], m.hparams, copy=False, return_orig_weights=True,
                          keep_original_weight=False)
            sync(device)
            seconds = time.perf_counter() - t0
        if not (isinstance(out, tuple) and len(out) == 2):
            raise MKEError(f"method {m.label!r}: apply returned {type(out).__name__}, not (edited_model, weights_copy)")
        return out[0], out[1], seconds, mem

    def _generate(self, m: BoundMethod, edited: Any, request: dict[str, Any], n_tokens: int) -> str | None:
        if not self.cfg.generate:
            return None
        from mke_plugins.adapters.base import Query

        try:
            return self.adapter.generate(edited, self.tok, Query(request.get("image"), request["prompt"],
                                                                 request["target"]),
                                         max_new_tokens=max(1, n_tokens))
        except (AttributeError, NotImplementedError) as exc:
            note = f"{m.label}: greedy generation unavailable ({type(exc).__name__}: {exc})"
            if note not in self.notes:
                self.notes.append(note)
            return None

    def _case(self, index: int, request: dict[str, Any], pb: ProbeBatches, pre: list[ProbeOutput],
              post: list[ProbeOutput], generated: str | None) -> dict[str, Any]:
        case = {"index": index, "case_id": request.get("case_id", index)}
        case.update(score_case(pb.probes, pre, post))
        known = self._understood.get(index, {})
        case.update({f"{kind}_understood": known.get(kind) for kind in GENERALITY_KINDS})
        case["generated"] = generated
        case["rewrite_exact_match"] = (None if generated is None
                                       else generated.strip() == str(request["target"]).strip())
        return case

    @staticmethod
    def _cost(case: dict[str, Any], seconds: float, fwdbwd: float, mem: PeakMemory, extra: dict[str, Any]) -> None:
        case.update(edit_seconds=seconds, fwdbwd_seconds=fwdbwd, peak_memory_mb=mem.peak_mb,
                    peak_memory_delta_mb=mem.delta_mb, memory_source=mem.source, extra=extra)

    # -- protocols -----------------------------------------------------------------------
    def _single_case(self, i: int, tick: Callable[[str], None]) -> dict[str, dict[str, Any]]:
        """Case ``i`` edited by every method in turn (one unit of work): ``{method: case}``."""
        request, base_seed = self.requests[i], self.cfg.seed or 0
        pb, edit_batch = self._batches(request)
        pre = self._pre_outputs(i, pb)
        n_target = int(pre[0].top1.shape[0])
        out: dict[str, dict[str, Any]] = {}
        for m in self.methods:
            fwdbwd = fwd_bwd_seconds(self.adapter, self.model, edit_batch)
            check = self._state_check()
            edited, wc, seconds, mem = self._apply(m, request, base_seed + i)
            post = run_probes(self.adapter, edited, pb)
            generated = self._generate(m, edited, request, n_target)
            extra = method_extra(wc)
            self.model = restore_like_easyedit(m.restore, self.model, edited, wc)
            del edited, wc
            if check is not None:
                check.verify(self.model, m.label, f"after case {i} (case_id {request.get('case_id', i)})")
            case = self._case(i, request, pb, pre, post, generated)
            self._cost(case, seconds, fwdbwd, mem, extra)
            out[m.label] = case
            tick(m.label)
        self._pre.pop(i, None)  # single mode needs a case's pre outputs once
        return out

    def chunks(self) -> list[list[int]]:
        n = len(self.requests)
        size = self.cfg.sequential_n or n
        return [list(range(s, min(s + size, n))) for s in range(0, n, size)]

    def _sequence(self, m: BoundMethod, plan: SequencePlan,
                  tick: Callable[[str], None]) -> tuple[list[dict[str, Any]], list[Checkpoint]]:
        """One sequence of ``m``'s edits (one unit of work): its end-of-sequence cases and its checkpoints."""
        chunk, base_seed = plan.cases, self.cfg.seed or 0
        prepared = []
        budget = self.cfg.keep_batches_mb * 2 ** 20
        for i, cp in zip(chunk, plan.plans, strict=True):
            pb = build_batches(self.adapter, self.model, self.tok, cp.probes, self.probe_batch)
            edit_batch = self.adapter.batch(self.model, self.tok, [cp.probes[0].query])
            fwdbwd = fwd_bwd_seconds(self.adapter, self.model, edit_batch)
            pre = self._pre_outputs(i, pb)
            budget -= pb.nbytes
            prepared.append((i, cp, pb if budget >= 0 else None, pre, fwdbwd))  # None: batched again when needed
        on_curve = curve_ts(self.cfg.checkpoints, self.cfg.sequential_n or len(self.requests))
        ts = sorted({t for t in on_curve if t <= len(chunk)} | {len(chunk)})
        check = self._state_check()
        done: list[tuple[Any, Any]] = []
        costs: list[tuple[float, float, PeakMemory, dict[str, Any]]] = []
        points: list[Checkpoint] = []
        cases: list[dict[str, Any]] = []
        edited = self.model
        try:
            at_edit: list[dict[str, Any]] = []
            for made, (i, _, _, _, fwdbwd) in enumerate(prepared, start=1):
                edited, wc, seconds, mem = self._apply(m, self.requests[i], base_seed + i)
                done.append((edited, wc))
                costs.append((seconds, fwdbwd, mem, method_extra(wc)))
                at_edit.append(self._at_edit(edited, prepared[made - 1]))
                tick(m.label)
                if made not in ts:
                    continue
                last = made == len(chunk)
                cases = [self._sequence_case(m, edited, prepared[k], made, costs[k] if last else None, len(chunk))
                         for k in range(made)]
                if last:
                    for case, scores in zip(cases, at_edit, strict=True):
                        case.update(scores)
                if made in on_curve:  # a shorter last sequence's own end counts in the row, not on the curve
                    points.append(Checkpoint(made, cases, [c[0] for c in costs],
                                             [_added_bytes(c[3]) for c in costs]))
        finally:
            for edited_k, wc_k in reversed(done):
                self.model = restore_like_easyedit(m.restore, self.model, edited_k, wc_k)
            del done, edited
        if check is not None:
            check.verify(self.model, m.label, f"of a {len(chunk)}-edit sequence (cases {chunk[0]}..{chunk[-1]})")
        return cases, points

    def _kept_batches(self, prepared: tuple[Any, ...]) -> ProbeBatches:
        """A sequence case's probe batches: kept from the pre pass, or (beyond keep_batches_mb) the same
        batches built again (the processor needs no model state)."""
        _, cp, pb, _, _ = prepared
        return pb if pb is not None else build_batches(self.adapter, self.model, self.tok, cp.probes,
                                                       self.probe_batch)

    def _at_edit(self, edited: Any, prepared: tuple[Any, ...]) -> dict[str, Any]:
        """EasyEdit's sequential protocol: the case just edited, scored at once, before the next edit."""
        i, _, _, pre, _ = prepared
        pb = self._kept_batches(prepared)
        case = self._case(i, self.requests[i], pb, pre, run_probes(self.adapter, edited, pb), None)
        return {f"{k}_at_edit": case.get(k) for k in AT_EDIT_KEYS}

    def _sequence_case(self, m: BoundMethod, edited: Any, prepared: tuple[Any, ...], made: int,
                       cost: tuple[Any, ...] | None, length: int) -> dict[str, Any]:
        """One case of a sequence scored on ``edited`` after ``made`` edits; ``cost``: at the end only."""
        i, cp, _, pre, _ = prepared
        pb = self._kept_batches(prepared)
        post = run_probes(self.adapter, edited, pb)
        generated = None
        if cost is not None:  # greedy decoding once, after the last edit
            generated = self._generate(m, edited, self.requests[i], int(pre[0].top1.shape[0]))
        case = self._case(i, self.requests[i], pb, pre, post, generated)
        case.update(cross_edit_scores(cp, post, made))
        if cost is not None:
            self._cost(case, *cost)
            case["sequence_length"] = length
        return case

    # -- units of work, ranks and the journal ------------------------------------------------
    def units(self) -> list[dict[str, Any]]:
        """Every unit of work, in report order: a case (single mode) or one method's sequence."""
        if self.cfg.mode == "single":
            return [{"unit": "case", "index": i} for i in range(len(self.requests))]
        return [{"unit": "sequence", "method": m.label, "start": plan.cases[0]}
                for m in self.methods for plan in self.plans]

    def _edits(self, unit: dict[str, Any]) -> int:
        if unit["unit"] == "case":
            return len(self.methods)
        return len(next(p.cases for p in self.plans if p.cases[0] == unit["start"]))

    def _run_unit(self, unit: dict[str, Any], tick: Callable[[str], None]) -> dict[str, Any]:
        """Run one unit; its record as the journal holds it (plain JSON values)."""
        first_note = len(self.notes)
        if unit["unit"] == "case":
            record = dict(unit, cases=self._single_case(unit["index"], tick))
        else:
            m = next(m for m in self.methods if m.label == unit["method"])
            plan = next(p for p in self.plans if p.cases[0] == unit["start"])
            cases, points = self._sequence(m, plan, tick)
            record = dict(unit, cases=cases, points=[vars(p) for p in points])
        record["notes"] = self.notes[first_note:]
        return _plain(record)

    def fingerprint(self) -> dict[str, Any]:
        """What a journal must match to be resumed: data, model, methods, hparams and the protocol."""
        cfg = self.cfg
        return _plain({
            "model": self.model_path, "data": str(self.data_path), "data_digest": data_digest(self.dataset.requests),
            "cases": len(self.requests), "mode": cfg.mode, "sequential_n": cfg.sequential_n,
            "checkpoints": cfg.checkpoints, "seed": cfg.seed, "dtype": cfg.dtype, "generate": cfg.generate,
            "methods": [m.label for m in self.methods],
            # the device differs between ranks and launches; it is no part of what an edit computes
            "hparams": {m.label: {k: v for k, v in hparams_json(m.hparams).items() if k != "device"}
                        for m in self.methods}})

    def _merge(self, records: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
        """Every rank's and the journal's units, in report order: ``{method: [case, ...]}`` and the curves."""
        runs: dict[str, list[dict[str, Any]]] = {m.label: [] for m in self.methods}
        self.curves = {m.label: [] for m in self.methods}
        order = {unit_key(u): k for k, u in enumerate(self.units())}
        for record in sorted((r for r in records if unit_key(r) in order), key=lambda r: order[unit_key(r)]):
            self.notes.extend(n for n in record.get("notes", []) if n not in self.notes)
            if record["unit"] == "case":
                for label, case in record["cases"].items():
                    runs[label].append(case)
            else:
                runs[record["method"]].extend(record["cases"])
                self.curves[record["method"]].extend(Checkpoint(**p) for p in record["points"])
        return runs

    def run(self) -> dict[str, Any] | None:
        """Run this rank's units; on rank 0 the merged result (see ``mke_plugins.bench``), elsewhere ``None``.

        With a journal, Ctrl-C in one process ends the run early: the result holds the units done
        so far and ``interrupted`` says how many (the journal has them; ``--resume`` does the rest).
        """
        try:
            records = self._run_units()
        finally:
            self.ranks.close()
        if records is None:
            return None
        runs = self._merge(records)
        for label, cases in runs.items():  # a method that built a per-model cache inside a timed edit (ASAM's bank)
            for case in cases:
                extra = case.get("extra") or {}
                if extra.get("memory_source") == "built":
                    self.notes.append(f"{label} built its memory bank ({extra.get('memory_states')} states, "
                                      f"{float(extra.get('memory_seconds') or 0):.1f} s) inside case "
                                      f"{case['index']}'s edit; later edits reuse it")
        result = self.report(runs)
        if self.interrupted is not None:
            result["interrupted"] = self.interrupted
            result["notes"].append(f"interrupted: {self.interrupted['units_done']} of {self.interrupted['units']} "
                                   "units done; the rows hold only those")
        return result

    def _run_units(self) -> list[dict[str, Any]] | None:
        from tqdm.auto import tqdm

        cfg, ranks = self.cfg, self.ranks
        units = self.units()
        journal = Journal(cfg.journal, ranks, self.fingerprint(), cfg.resume) if cfg.journal else None
        new: list[dict[str, Any]] = []
        before = torch.get_num_threads()
        try:
            done = journal.open() if journal is not None else {}
            if cfg.resume and ranks.main:
                self.notes.append(f"resumed: {len(done)} of {len(units)} units read from the journal")
            if journal is not None and journal.discarded:
                self.notes.append(f"started over: {journal.discarded} finished units an earlier run left beside "
                                  f"{cfg.journal} were removed (--resume keeps them)")
            todo = [u for u in units if unit_key(u) not in done]
            count = SharedCount(ranks)
            initial = sum(self._edits(u) for u in units if unit_key(u) in done)
            if self.threads:
                torch.set_num_threads(self.threads)
            with tqdm(total=len(self.requests) * len(self.methods), initial=initial, desc="bench", unit="edit",
                      disable=not (cfg.progress and ranks.main), dynamic_ncols=True) as bar:
                def show(n: int) -> None:
                    bar.n = initial + n
                    bar.refresh()

                def tick(label: str) -> None:
                    bar.set_description(f"bench {label}", refresh=False)
                    show(count.add(1))

                try:
                    for unit in ranks.mine(todo):
                        record = self._run_unit(unit, tick)
                        with ctrl_c_after():  # journaled and counted together: "interrupted" matches the journal
                            if journal is not None:
                                journal.append(record)
                            new.append(record)
                except KeyboardInterrupt:
                    if ranks.spread or journal is None:
                        raise
                    self.interrupted = {"units_done": len(done) + len(new), "units": len(units)}
                finally:
                    count.finish()
                if ranks.main and self.interrupted is None:
                    count.wait_all(show)
        finally:
            torch.set_num_threads(before)
            if journal is not None:
                journal.close()
        gathered = ranks.gather(new)
        return None if gathered is None else list(done.values()) + [r for g in gathered for r in g]

    def report(self, runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
        methods: dict[str, Any] = {}
        for m in self.methods:
            cases = runs[m.label]
            row = aggregate(cases)
            ordered = {k: row.pop(k) for k in SCHEMA_KEYS}
            ordered.update(row)
            ordered["source"] = m.source
            ordered["restore"] = m.restore
            ordered["restore_verified"] = self.cfg.verify_restore
            ordered["hparams"] = hparams_json(m.hparams)
            if self.cfg.mode == "sequential":
                ordered["curve"] = curve(self.curves.get(m.label, []))
            if self.cfg.keep_cases:
                ordered["cases"] = cases
            methods[m.label] = ordered
        return {
            "model": self.model_path,
            "data": str(self.data_path),
            "mode": self.cfg.mode,
            "cases": len(self.requests),
            "sequential_n": (self.cfg.sequential_n or len(self.requests)) if self.cfg.mode == "sequential" else None,
            "checkpoints": sorted(set(self.cfg.checkpoints)) if self.cfg.checkpoints else None,
            "seed": self.cfg.seed,
            "device": str(next(self.model.parameters()).device),
            "threads": self.threads or torch.get_num_threads(),
            "processes": self.ranks.size,
            "hparams": self.cfg.hparams,
            "notes": list(self.notes),
            "methods": methods,
        }


def run_bench(cfg: BenchConfig) -> dict[str, Any] | None:
    """Run the configured bench and return the result dict (see ``mke_plugins.bench``).

    Under ``torchrun`` / ``accelerate launch`` only rank 0 returns it; the other ranks return ``None``.
    """
    return Bench(cfg).run()


def methods_from(text: str | Sequence[str] | None) -> list[MethodRequest] | None:
    from .methods import parse_method, parse_methods

    if text is None:
        return None
    if isinstance(text, str):
        return parse_methods(text)
    return [parse_method(t) for t in text]
