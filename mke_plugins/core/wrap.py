"""Gates and ``GatedModel``: hook-based edits that are active only when the edited model is called.

Hook-based methods (UniKE's neurons, LDKE's routed weights, ASAM's patches) install hooks on the
base model but check a named *gate* before acting. :class:`GatedModel` is what such a method
returns as ``edited_model``: calling it (``__call__``, ``forward``, ``generate``) opens its gates
for the duration of the call, so EasyEdit's evaluators see the edit through ``edited_model``
while the base model's own forward stays original (honest "pre" metrics). Gates live in a side
table keyed weakly by the model, never in its module tree.

``GatedModel`` is a plain object, not an ``nn.Module``: everything it does not define is
forwarded to the base model (``config``, ``device``, ``parameters()``, ``state_dict()``...), and
wrapping a ``GatedModel`` again merges the gate names instead of nesting (:func:`gated`).
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections import Counter
from typing import Any, Iterable, Iterator

from torch import nn

from mke_plugins.adapters.base import unwrap_model

__all__ = ["GatedModel", "gate_open", "gate_opening", "gate_restore", "gate_snapshot", "gated", "is_gate_open",
           "set_always_on"]


class _GateState:
    def __init__(self) -> None:
        self.depth: Counter[str] = Counter()
        self.always: set[str] = set()
        #: per gate, the number of its current (or last) opening (see :func:`gate_opening`)
        self.openings: dict[str, int] = {}


#: opening numbers, unique in the process (a model's gate state may be dropped and made again)
_OPENINGS = itertools.count(1)


_GATES: "weakref.WeakKeyDictionary[nn.Module, _GateState]" = weakref.WeakKeyDictionary()


def _state(model: Any) -> _GateState:
    base = unwrap_model(model)
    st = _GATES.get(base)
    if st is None:
        st = _GATES[base] = _GateState()
    return st


def is_gate_open(model: Any, name: str) -> bool:
    """True while a ``GatedModel`` call (or :func:`gate_open`) has ``name`` open, or it is always on."""
    st = _GATES.get(unwrap_model(model))
    return st is not None and (st.depth[name] > 0 or name in st.always)


@contextlib.contextmanager
def gate_open(model: Any, *names: str) -> Iterator[None]:
    """Open the named gates of ``model`` for the block (re-entrant; closed again on exceptions)."""
    st = _state(model)
    for n in names:
        if st.depth[n] == 0:
            st.openings[n] = next(_OPENINGS)
        st.depth[n] += 1
    try:
        yield
    finally:
        for n in names:
            st.depth[n] -= 1
            if st.depth[n] <= 0:
                del st.depth[n]


def gate_opening(model: Any, name: str) -> int | None:
    """Which opening of gate ``name`` is in progress: a number, unique in the process, that changes each
    time the gate goes from closed to open (``None`` while it is always on, or closed: then no opening
    spans several calls).

    Hooks may cache work that stays valid while nothing outside a call changes, and re-check it when
    the number changes (the neuron stack, :mod:`~mke_plugins.core.neuron_stack`)."""
    st = _GATES.get(unwrap_model(model))
    if st is None or name in st.always or st.depth[name] <= 0:
        return None
    return st.openings.get(name)


def set_always_on(model: Any, name: str, on: bool = True) -> None:
    """Keep gate ``name`` open on the bare model too (e.g. ``unike.set_active(model, True)``)."""
    st = _state(model)
    if on:
        st.always.add(name)
    else:
        st.always.discard(name)


def gate_snapshot(model: Any) -> tuple[dict[str, int], set[str]] | None:
    """The model's open and always-on gates, for :func:`gate_restore` (None: no gate state yet)."""
    st = _GATES.get(unwrap_model(model))
    return None if st is None else (dict(st.depth), set(st.always))


def gate_restore(model: Any, saved: tuple[dict[str, int], set[str]] | None) -> None:
    """Put the model's gates back as :func:`gate_snapshot` saw them."""
    base = unwrap_model(model)
    if saved is None:
        _GATES.pop(base, None)
        return
    st = _state(base)
    st.depth.clear()
    st.depth.update(saved[0])
    st.always = set(saved[1])
    for name in set(st.openings) | set(st.depth):  # whatever was cached during an opening is re-checked
        st.openings[name] = next(_OPENINGS)


class GatedModel:
    """The base model with its gates opened on every call. ``.model`` is the base model itself."""

    mke_wrapped = True

    def __init__(self, model: nn.Module, gates: Iterable[str]) -> None:
        object.__setattr__(self, "model", unwrap_model(model))
        object.__setattr__(self, "gates", tuple(dict.fromkeys(gates)))
        if not self.gates:
            raise ValueError("GatedModel needs at least one gate name")

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        with gate_open(self.model, *self.gates):
            return self.model(*args, **kwargs)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with gate_open(self.model, *self.gates):
            return self.model(*args, **kwargs)

    def generate(self, *args: Any, **kwargs: Any) -> Any:
        with gate_open(self.model, *self.gates):
            return self.model.generate(*args, **kwargs)

    # chainable module methods return the wrapper, not the bare model
    def to(self, *args: Any, **kwargs: Any) -> "GatedModel":
        self.model.to(*args, **kwargs)
        return self

    def cuda(self, *args: Any, **kwargs: Any) -> "GatedModel":
        self.model.cuda(*args, **kwargs)
        return self

    def cpu(self) -> "GatedModel":
        self.model.cpu()
        return self

    def eval(self) -> "GatedModel":
        self.model.eval()
        return self

    def train(self, mode: bool = True) -> "GatedModel":
        self.model.train(mode)
        return self

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "model"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(self.model, name, value)

    def __repr__(self) -> str:
        return f"GatedModel(gates={list(self.gates)}, model={type(self.model).__name__})"


def gated(model: Any, *names: str) -> GatedModel:
    """Wrap ``model`` with gates ``names``; an existing ``GatedModel`` keeps its gates too (no nesting)."""
    old = tuple(model.gates) if isinstance(model, GatedModel) else ()
    return GatedModel(unwrap_model(model), old + names)
