"""The encoder cache: within one edit each picture goes through the vision tower once.

Why it exists: an edit runs tens to hundreds of forward passes on the same few pictures (ASAM
even batches one picture K times per pass), and every pass re-encodes each of them. The tower's
output depends only on the picture and the tower's weights, so while the tower is frozen and
unchanged the first result can stand in for every later one, bit for bit.

:func:`encoder_cache` is the context an apply runs inside (the template enters it through
``adapter.encoder_cache(model)``); the family adapters look the active :class:`EncoderCache` up
with :func:`active_cache` in their ``forward`` and store or reuse encoder outputs through
:meth:`EncoderCache.lookup`. The cache is exact or absent:

* **keys** are the bytes of the inputs (a BLAKE2b digest per tensor, plus shape, dtype, device
  and the autocast state), so a batch rebuilt every step still hits and a picture changed in
  place misses; a digest is remembered per tensor object and ``_version`` so a batch forwarded
  again is not hashed again;
* **validity**: :meth:`EncoderCache.usable` is false (the caller runs the tower as usual) while
  any tower parameter requires grad, any tower module is in training mode or carries a hook, a
  global module hook is set, or an input requires grad; when a tower parameter or buffer was
  replaced or changed in place (its ``_version``), every entry is dropped first;
* **lifetime**: entries live until the context exits (never across edits); leaving it restores
  whatever the adapter patched for families whose forward takes no precomputed features.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Iterator, Sequence

import torch
import torch.nn.modules.module as _tm
from torch import nn

__all__ = ["CacheStats", "EncoderCache", "active_cache", "encoder_cache"]

_ACTIVE: contextvars.ContextVar[tuple["EncoderCache", ...]] = contextvars.ContextVar("mke_encoder_caches",
                                                                                      default=())
_GLOBAL_HOOKS = ("_global_forward_hooks", "_global_forward_pre_hooks", "_global_backward_hooks",
                 "_global_backward_pre_hooks", "_global_forward_hooks_always_called")
_MODULE_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
#: digests remembered before the ones of freed tensors are dropped
_MEMO_LIMIT = 4096
#: modules whose hooks only record outputs and change nothing (transformers installs these on the
#: vision layers at the first forward, for ``output_hidden_states``): they do not stop the cache
PASSIVE_HOOK_MODULES = ("transformers.utils.output_capturing",)


def _active_hooks(module: nn.Module) -> bool:
    """Whether ``module`` carries a hook that may read or change what it computes."""
    for attr in _MODULE_HOOKS:
        for hook in (getattr(module, attr, None) or {}).values():
            if not str(getattr(hook, "__module__", "")).startswith(PASSIVE_HOOK_MODULES):
                return True
    return False


@dataclass
class CacheStats:
    """Counters of one cache: ``encoded`` entries computed, ``hits`` reused, ``bypassed`` lookups
    refused because the tower was trainable, hooked, in training mode or fed a grad input, and
    ``invalidated`` times the towers changed and the entries made so far were dropped."""

    encoded: int = 0
    hits: int = 0
    bypassed: int = 0
    invalidated: int = 0


def _tensor_digest(t: torch.Tensor) -> str:
    data = t.detach()
    if data.device.type != "cpu":
        data = data.cpu()
    data = data.contiguous()
    raw = data.view(torch.uint8) if data.dtype != torch.bool else data.to(torch.uint8)
    return hashlib.blake2b(raw.reshape(-1).numpy(), digest_size=20).hexdigest()


def _versions(value: Any) -> tuple[int, ...]:
    """``_version`` of every tensor in ``value`` (nested tuples, lists and model outputs)."""
    if torch.is_tensor(value):
        return (value._version,)
    if isinstance(value, dict):
        value = list(value.values())
    if isinstance(value, (tuple, list)):
        return tuple(v for item in value for v in _versions(item))
    return ()


class EncoderCache:
    """Encoder outputs of one model for the duration of one :func:`encoder_cache` context.

    ``towers`` are the modules whose weights the cached outputs depend on (the vision tower and
    any projector after it); ``params`` extra parameters outside them (LLaVA's image newline).
    """

    def __init__(self, model: nn.Module, towers: Sequence[nn.Module], params: Sequence[nn.Parameter] = ()) -> None:
        self.model = model
        self.towers = list(towers)
        self.extra = list(params)
        self.stats = CacheStats()
        self._entries: dict[tuple[Any, ...], Any] = {}
        self._digests: dict[int, tuple[weakref.ref, int, str]] = {}
        self._flat: list[nn.Module] = []
        self._state: tuple[Any, ...] | None = None
        self.closed = False
        self._rescan()

    # -- validity ------------------------------------------------------------------------
    def _rescan(self) -> None:
        """Re-read the towers' module tree (it is checked, not walked, on every lookup)."""
        self._flat = [m for tower in self.towers for m in tower.modules()]
        self._state = self._scan()

    def _scan(self) -> tuple[Any, ...] | None:
        """The towers' identity-and-version state in one flat pass; ``None`` when the cache must
        stand aside (a trainable parameter, a module in training mode or with an active hook)."""
        state: list[Any] = []
        for m in self._flat:
            if m.training or _active_hooks(m):
                return None
            for p in m._parameters.values():
                if p is not None:
                    if p.requires_grad:
                        return None
                    state.append((id(p), p._version))
            for buf in m._buffers.values():
                if buf is not None:
                    state.append((id(buf), buf._version))
            state.append(tuple(map(id, m._modules.values())))  # a swapped or added child shows here
        for p in self.extra:
            if p.requires_grad:
                return None
            state.append((id(p), p._version))
        return tuple(state)

    def usable(self, *inputs: torch.Tensor) -> bool:
        """Whether cached outputs may stand in for the tower on ``inputs`` now (counts a refusal).

        When the towers changed since the entries were made (a parameter or buffer replaced or
        written in place, a child module swapped), the entries are dropped first."""
        state = None
        if not (self.closed or any(t.requires_grad for t in inputs) or any(getattr(_tm, k, None)
                                                                             for k in _GLOBAL_HOOKS)):
            state = self._scan()
        if state is None:
            self.stats.bypassed += 1
            return False
        if state != self._state:
            self._rescan()
            if self._state is None:
                self.stats.bypassed += 1
                return False
            if self._entries:
                self._entries.clear()
                self.stats.invalidated += 1
        return True

    # -- keys ----------------------------------------------------------------------------
    def digest(self, t: torch.Tensor, span: tuple[int, int] | None = None) -> str:
        """Content digest of ``t`` (of ``t[start:stop]`` with ``span``), remembered per tensor
        object, ``_version`` and span so a batch forwarded again is not hashed again."""
        memo = (id(t), span)
        seen = self._digests.get(memo)
        if seen is not None and seen[0]() is t and seen[1] == t._version:
            return seen[2]
        d = _tensor_digest(t if span is None else t[span[0]:span[1]])
        if len(self._digests) >= _MEMO_LIMIT:  # forget tensors that are gone
            self._digests = {k: v for k, v in self._digests.items() if v[0]() is not None}
        self._digests[memo] = (weakref.ref(t), t._version, d)
        return d

    def key(self, kind: str, *items: torch.Tensor | tuple[torch.Tensor, int, int] | None,
            extra: Any = ()) -> tuple[Any, ...]:
        """A key of the content of ``items`` and the autocast state: each a tensor, ``None``, or
        ``(tensor, start, stop)`` for the rows ``tensor[start:stop]``."""
        parts: list[Any] = [kind, extra]
        for item in items:
            if item is None:
                parts.append(None)
                continue
            t, span = (item, None) if torch.is_tensor(item) else (item[0], (int(item[1]), int(item[2])))
            shape = tuple(t.shape) if span is None else (span[1] - span[0], *t.shape[1:])
            dev = t.device.type
            cast = torch.get_autocast_dtype(dev) if torch.is_autocast_enabled(dev) else None
            parts.append((shape, str(t.dtype), str(t.device), str(cast), self.digest(t, span)))
        return tuple(parts)

    def lookup(self, key: tuple[Any, ...], compute: Callable[[], Any]) -> Any:
        """The entry under ``key``, computed (without grad) and stored on a miss. A stored tensor
        that was since changed in place (its ``_version``) counts as a miss."""
        entry = self._entries.get(key)
        if entry is not None and entry[1] == _versions(entry[0]):
            self.stats.hits += 1
            return entry[0]
        with torch.no_grad():
            value = compute()
        self._entries[key] = (value, _versions(value))
        self.stats.encoded += 1
        return value

    def clear(self) -> None:
        self._entries.clear()
        self._digests.clear()
        self.closed = True


def active_cache(base: nn.Module) -> EncoderCache | None:
    """The innermost active cache of the bare model ``base`` (unwrap a ``GatedModel`` first)."""
    for cache in reversed(_ACTIVE.get()):
        if cache.model is base:
            return cache
    return None


@contextlib.contextmanager
def encoder_cache(cache: EncoderCache, patches: Sequence[contextlib.AbstractContextManager] = ()
                  ) -> Iterator[EncoderCache]:
    """Make ``cache`` active (and enter ``patches``) until the block exits; then drop its entries."""
    token = _ACTIVE.set(_ACTIVE.get() + (cache,))
    try:
        with contextlib.ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield cache
    finally:
        _ACTIVE.reset(token)
        cache.clear()
