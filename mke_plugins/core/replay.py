"""Prefix replay: re-run only the decoder layers an edit can change.

Why it exists: an edit loop runs the same batch through the model tens or hundreds of times, but
when everything it trains or hooks sits at or above decoder layer ``L``, the vision tower, the
embeddings, the attention mask, the rotary positions and layers ``0..L-1`` give the same result on
every pass. :func:`prefix_replay` captures, once per distinct batch, what the full forward hands
to layer ``L`` (the hidden state and every other argument: mask, position ids, M-RoPE position
embeddings, ...), and each later pass calls only layers ``L..``, the final norm and the LM head
with exactly those arguments. The logits are the ones the full forward computes (bit-identical on
CPU; the tests check every family).

It is family-agnostic: it reads only the adapter's ``layers``, ``final_norm`` and ``lm_head``, and
learns from the first (full) pass of each batch how the model chains them. Replay is used for a
batch only when that pass shows the plain chain (each layer's output is the next layer's input, the
last one's goes to the final norm, whose output goes to the LM head, whose output is the logits, each
module called once); otherwise (Qwen3-VL's deepstack adds vision features between early layers, a
LAVIS wrapper post-processes the logits) every pass of that batch runs the full model. It also
runs the full model whenever the prefix may not be fixed:

* a parameter outside layers ``L..``, the final norm and the LM head requires grad (a tied LM head
  counts as the embedding), or a prefix module is in training mode (dropout);
* the model, or a module containing the decoder stack, has a forward hook (it would be skipped);
* since the capture, a prefix parameter was written (its ``_version``), the prefix's hooks changed,
  the batch's input tensors were written, or another set of gates is open (keyed per batch).

Nothing is added to the model between passes: the capture pass's hooks are removed in ``finally``
and the cache lives on the :class:`PrefixReplay` object, cleared when its ``with`` block ends.
:func:`replay_watch` (for tests) makes every stale-prefix fallback raise and collects each
replay's counters.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from mke_plugins.adapters.base import AnswerLogits, Batch, VLMAdapter, unwrap_model

from .layer_memo import LayerMemo, MemoPlan
from .wrap import gate_open, gate_snapshot

__all__ = ["PrefixReplay", "ReplayStats", "StalePrefixError", "prefix_replay", "replay_watch"]

log = logging.getLogger(__name__)
_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks")
#: entries kept per replay (one per distinct batch; an edit loop uses one or two)
MAX_ENTRIES = 4


class StalePrefixError(RuntimeError):
    """Under :func:`replay_watch`: the part below the replay layer changed while a replay was active."""


@dataclass
class ReplayStats:
    """What one :class:`PrefixReplay` did: passes served from the cache, full passes and why."""

    start: int | None
    captures: int = 0
    replays: int = 0
    full: int = 0
    reasons: dict[str, int] = field(default_factory=dict)
    memoized: int = 0  # modules of layer ``start`` served from the capture on the last replayed pass (``inside``)

    def declined(self, reason: str) -> None:
        self.full += 1
        self.reasons[reason] = self.reasons.get(reason, 0) + 1


_WATCH: contextvars.ContextVar[list[ReplayStats] | None] = contextvars.ContextVar("mke_replay_watch", default=None)


@dataclass
class _Entry:
    inputs: list[torch.Tensor]  # held so the ids in the key stay theirs
    hidden: torch.Tensor
    hidden_version: int
    calls: list[tuple[tuple[Any, ...], dict[str, Any]]]  # per layer L..: positional args after the state, kwargs
    versions: tuple[int, ...]
    hooks: int
    memo: MemoPlan | None = None  # parts of layer ``start`` served from the capture (``inside``)


@dataclass
class _Captured:
    """A capture pass's logits, and the final norm's output when the batch was cached for replay."""

    logits: torch.Tensor
    normed: torch.Tensor | None = None


def _hook_count(modules: list[nn.Module]) -> int:
    return sum(len(getattr(m, d)) for m in modules for d in _HOOK_DICTS)


def _without_empty_cache(kwargs: dict[str, Any], layer: int) -> dict[str, Any] | None:
    """``kwargs`` with a key-value cache that holds nothing for ``layer`` yet dropped (``use_cache``
    off): a layer then attends over exactly the same keys, and a replayed pass must not append to
    the capture's cache. ``None`` when the cache already holds entries for the layer (a real past)."""
    for key, value in list(kwargs.items()):
        if callable(getattr(value, "get_seq_length", None)) and callable(getattr(value, "update", None)):
            if value.get_seq_length(layer) != 0:
                return None
            kwargs[key] = None
            if "use_cache" in kwargs:
                kwargs["use_cache"] = False
    return kwargs


def _leaves(value: Any) -> Iterator[Any]:
    """The tensors and plain values of a (nested) input structure, in order."""
    if isinstance(value, dict):
        for k in sorted(value, key=str):
            yield k
            yield from _leaves(value[k])
    elif isinstance(value, (list, tuple)):
        yield len(value)
        for v in value:
            yield from _leaves(v)
    else:
        yield value


def _same_view(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Whether ``b`` reads exactly ``a``'s elements in ``a``'s layout (``h[:, 0:]`` is such a view)."""
    return (a.data_ptr() == b.data_ptr() and a.shape == b.shape and a.stride() == b.stride()
            and a.dtype == b.dtype)


class PrefixReplay:
    """An adapter whose ``forward``/``loss`` re-run only layers ``start..`` (see the module docstring).

    Everything else is the wrapped adapter's. ``start=None`` turns replay off (every pass is the
    adapter's own forward). Use it through :func:`prefix_replay`.
    """

    def __init__(self, adapter: VLMAdapter, model: Any, start: int | None, *, strict: bool = False,
                 inside: nn.Module | None = None) -> None:
        self.adapter = adapter
        self.base = unwrap_model(model)
        self.strict = strict
        self.stats = ReplayStats(start)
        self._cache: dict[tuple[Any, ...], _Entry] = {}
        self._plain: dict[tuple[Any, ...], str] = {}  # batches whose chain is not plain (why): always full
        infos = adapter.layers(self.base)
        if start is not None and not 0 <= start < len(infos):
            raise ValueError(f"prefix replay: start layer {start} is outside the {len(infos)} decoder layers")
        self.start = start
        if start is None:
            return
        self._layers = [i.layer for i in infos[start:]]
        self._memo = LayerMemo(self._layers[0], inside) if inside is not None else None
        self._norm = adapter.final_norm(self.base)
        self._head = adapter.lm_head(self.base)
        suffix = {id(m) for top in (*self._layers, self._norm, self._head) for m in top.modules()}
        self.prefix_modules = [m for m in self.base.modules() if id(m) not in suffix]
        seen: set[int] = set()
        self.prefix_params: list[torch.Tensor] = []
        for m in self.prefix_modules:
            for p in m._parameters.values():
                if p is not None and id(p) not in seen:
                    seen.add(id(p))
                    self.prefix_params.append(p)
        names = {id(m): n for n, m in self.base.named_modules()}
        first = names[id(self._layers[0])]
        self.ancestors = [m for n, m in self.base.named_modules() if n == "" or first.startswith(n + ".")]

    def __getattr__(self, name: str) -> Any:
        return getattr(self.adapter, name)

    # -- the adapter's face -------------------------------------------------------------------
    def loss(self, model: Any, batch: Batch, logits: torch.Tensor | None = None,
             reduction: Literal["mean", "row"] = "mean") -> torch.Tensor:
        """The adapter's loss, on replayed logits when ``logits`` is not given."""
        if logits is None:
            logits = self.forward(model, batch)
        return self.adapter.loss(model, batch, logits=logits, reduction=reduction)

    def forward(self, model: Any, batch: Batch) -> torch.Tensor:
        """Logits ``(B, T, V)`` for ``batch``, exactly the adapter's ``forward``'s."""
        found = self._lookup(model, batch, self.adapter.forward)
        if isinstance(found, _Entry):
            return self._head(self._replay(model, found))
        return found.logits if isinstance(found, _Captured) else found

    def answer_logits(self, model: Any, batch: Batch) -> AnswerLogits:
        """The adapter's ``answer_logits``, bit for bit: where the adapter applies the LM head to the
        answer rows only (``answer_rows_only``), so does the replay."""
        found = self._lookup(model, batch, self.adapter.answer_logits)
        if isinstance(found, _Entry):
            return self._answers(self._replay(model, found), batch)
        if isinstance(found, _Captured):
            if found.normed is not None:
                return self._answers(found.normed, batch)
            return self.adapter.gather_answers(found.logits, batch)
        return found

    def _answers(self, normed: torch.Tensor, batch: Batch) -> AnswerLogits:
        """Answer logits from the final norm's output, computed the way the adapter computes them."""
        if self.adapter.answer_rows_only(self.base):
            normed = normed[batch.answer_mask.to(normed.device)]
        return self.adapter.gather_answers(self._head(normed), batch)

    def _lookup(self, model: Any, batch: Batch, plain: Callable[[Any, Batch], Any]) -> Any:
        """A fresh cache entry to replay, a capture pass's result, or ``plain``'s (declined)."""
        if self.start is None:
            return plain(model, batch)
        reason = self._static_reason()
        if reason is not None:
            self.stats.declined(reason)
            return plain(model, batch)
        key = self._key(model, batch)
        if key in self._plain:
            self.stats.declined(self._plain[key])
            return plain(model, batch)
        entry = self._cache.get(key)
        if entry is not None:
            stale = self._stale(entry)
            if stale is None:
                self.stats.replays += 1
                return entry
            if self.strict:
                raise StalePrefixError(f"prefix replay from layer {self.start}: {stale} while the replay was "
                                       f"active; nothing below the replay layer may change inside it")
            log.debug("prefix replay: %s; capturing again", stale)
            del self._cache[key]
        return self._capture(model, batch, key)

    def clear(self) -> None:
        self._cache.clear()
        self._plain.clear()

    # -- checks ---------------------------------------------------------------------------------
    def _static_reason(self) -> str | None:
        for p in self.prefix_params:
            if p.requires_grad:
                return "a parameter below the replay layer requires grad"
        for m in self.prefix_modules:
            if m.training:
                return "a module below the replay layer is in training mode"
        if any(len(m._forward_hooks) for m in self.ancestors):
            return "a forward hook on a module around the decoder stack"
        if nn.modules.module._global_forward_hooks:
            return "a global forward hook"
        return None

    def _key(self, model: Any, batch: Batch) -> tuple[Any, ...]:
        leaves = tuple((id(v), v._version) if torch.is_tensor(v) else
                       (v if isinstance(v, (str, int, float, bool, type(None))) else ("id", id(v)))
                       for v in _leaves(batch.inputs))
        gates = gate_snapshot(self.base) or ({}, set())
        gate_key = (tuple(sorted(gates[0].items())), tuple(sorted(gates[1])))
        return leaves, gate_key, tuple(getattr(model, "gates", ()))

    def _versions(self) -> tuple[int, ...]:
        return tuple(p._version for p in self.prefix_params)

    def _stale(self, entry: _Entry) -> str | None:
        if entry.hidden._version != entry.hidden_version:
            return "the captured hidden state was written"
        if self._versions() != entry.versions:
            return "a parameter below the replay layer was written"
        if _hook_count(self.prefix_modules) != entry.hooks:
            return "the hooks below the replay layer changed"
        return LayerMemo.stale(entry.memo) if entry.memo is not None else None

    # -- the two kinds of pass ------------------------------------------------------------------
    def _capture(self, model: Any, batch: Batch, key: tuple[Any, ...]) -> _Captured:
        """One full forward that records what layer ``start`` receives and checks the chain."""
        n = len(self._layers)
        calls: list[tuple[tuple[Any, ...], dict[str, Any]] | None] = [None] * n
        ins: list[Any] = [None] * n
        outs: list[Any] = [None] * n
        counts = [0] * (n + 2)
        seen: dict[str, Any] = {}

        def pre(i: int):
            def hook(_m: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
                counts[i] += 1
                rest = _without_empty_cache(dict(kwargs), self.start + i)  # type: ignore[operator]
                if rest is None:
                    seen["cache"] = True
                    return
                if args:
                    ins[i], calls[i] = args[0], (tuple(args[1:]), rest)
                else:
                    ins[i] = rest.pop("hidden_states", None)
                    calls[i] = ((), rest)
            return hook

        def post(i: int):
            def hook(_m: nn.Module, _args: Any, out: Any) -> None:
                outs[i] = out[0] if isinstance(out, tuple) else out
            return hook

        def seen_as(name: str, slot: int, what: Literal["in", "out"]):
            def hook(_m: nn.Module, args: Any, *rest: Any) -> None:
                if what == "in":
                    counts[slot] += 1
                    seen[name + ".in"] = args[0] if args else None
                else:
                    seen[name + ".out"] = rest[0]
            return hook

        handles = []
        try:
            for i, layer in enumerate(self._layers):
                handles.append(layer.register_forward_pre_hook(pre(i), with_kwargs=True, prepend=True))
                handles.append(layer.register_forward_hook(post(i)))
            handles.append(self._norm.register_forward_pre_hook(seen_as("norm", n, "in"), prepend=True))
            handles.append(self._norm.register_forward_hook(seen_as("norm", n, "out")))
            handles.append(self._head.register_forward_pre_hook(seen_as("head", n + 1, "in"), prepend=True))
            handles.append(self._head.register_forward_hook(seen_as("head", n + 1, "out")))
            with self._memo.recording() if self._memo is not None else contextlib.nullcontext() as memo:
                logits = self.adapter.forward(model, batch)
        finally:
            for h in handles:
                h.remove()
        # after the pass: transformers installs its output-capturing hooks on a model's first forward
        versions, hooks = self._versions(), _hook_count(self.prefix_modules)
        why = self._chain_problem(logits, ins, outs, counts, seen, calls)
        if why is not None:
            self._plain[key] = why
            self.stats.declined(why)
            log.debug("prefix replay from layer %s declined for a batch: %s", self.start, why)
            return _Captured(logits)
        hidden = ins[0]
        if len(self._cache) >= MAX_ENTRIES:
            self._cache.pop(next(iter(self._cache)))
        plan = self._memo.plan(memo) if self._memo is not None else None
        self._cache[key] = _Entry([v for v in _leaves(batch.inputs) if not isinstance(v, (str, int, float))], hidden,
                                  hidden._version, calls, versions, hooks, plan)  # type: ignore[arg-type]
        self.stats.captures += 1
        return _Captured(logits, seen["norm.out"])

    def _chain_problem(self, logits: Any, ins: list[Any], outs: list[Any], counts: list[int],
                       seen: dict[str, Any], calls: list[Any]) -> str | None:
        if seen.get("cache"):
            return "the decoder layers read a key-value cache that already holds entries"
        if any(c != 1 for c in counts):
            return "a decoder layer, the final norm or the LM head ran other than once"
        if not torch.is_tensor(ins[0]) or ins[0].requires_grad or any(
                torch.is_tensor(v) and v.requires_grad for call in calls for v in _leaves(call)):
            return "the state entering the replay layer requires grad (an input below it is trained)"
        for i in range(1, len(ins)):
            if ins[i] is not outs[i - 1]:
                return f"the model changes the state between layers {self.start + i - 1} and {self.start + i}"
        if seen.get("norm.in") is not outs[-1]:
            return "the model changes the state between the last layer and the final norm"
        norm_out, head_in = seen.get("norm.out"), seen.get("head.in")
        if not (torch.is_tensor(norm_out) and torch.is_tensor(head_in) and _same_view(norm_out, head_in)):
            return "the LM head does not read the final norm's output"
        if logits is not seen.get("head.out"):
            return "the adapter's logits are not the LM head's output"
        return None

    def _replay(self, model: Any, entry: _Entry) -> torch.Tensor:
        """The final norm's output for a cached batch: layers ``start..`` from the captured state."""
        gates = tuple(getattr(model, "gates", ()))
        with gate_open(self.base, *gates) if gates else contextlib.nullcontext():
            h = entry.hidden
            for i, (layer, (args, kwargs)) in enumerate(zip(self._layers, entry.calls, strict=True)):
                memo = entry.memo if i == 0 else None
                with LayerMemo.serving(memo) if memo is not None else contextlib.nullcontext():
                    out = layer(h, *args, **kwargs)
                h = out[0] if isinstance(out, tuple) else out
            self.stats.memoized = len(entry.memo) if entry.memo is not None else 0
            return self._norm(h)


@contextlib.contextmanager
def prefix_replay(adapter: VLMAdapter, model: Any, start: int | None, *,
                  strict: bool | None = None, inside: nn.Module | None = None) -> Iterator[PrefixReplay]:
    """A :class:`PrefixReplay` from decoder layer ``start`` for the block; its cache is dropped on exit.

    ``start`` is the lowest decoder layer whose output the block's edits can change (``None``: no
    replay). ``inside``: the only module of layer ``start`` that the block changes (a value matrix
    with column offsets); what runs in that layer before it is then served from the capture too
    (:mod:`~mke_plugins.core.layer_memo`). ``strict`` (default: on inside :func:`replay_watch`) raises
    :class:`StalePrefixError` when the prefix changed under a cached batch instead of running the full
    model again.
    """
    watch = _WATCH.get()
    replay = PrefixReplay(adapter, model, start, strict=watch is not None if strict is None else strict,
                          inside=inside)
    try:
        yield replay
    finally:
        replay.clear()
        if watch is not None:
            watch.append(replay.stats)
        if start is not None:
            log.debug("prefix replay from layer %s: %s", start, replay.stats)


@contextlib.contextmanager
def replay_watch() -> Iterator[list[ReplayStats]]:
    """Collect the stats of every replay that ends inside the block, with stale-prefix fallbacks raising."""
    stats: list[ReplayStats] = []
    token = _WATCH.set(stats)
    try:
        yield stats
    finally:
        _WATCH.reset(token)
