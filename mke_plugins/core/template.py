"""One way to write a method: the apply skeleton every method runs through.

Why it exists: EasyEdit calls every method as
``apply(model, tok, requests, hparams, copy, return_orig_weights, keep_original_weight, **kwargs)``
and expects ``(edited_model, weights_copy)``. Everything around the algorithm — checking the
hyperparameters, getting the family adapter, normalising the requests, the three flags, undoing
a failed edit and reporting what each edit did — is the same for every method, so it is written
once, here. A method supplies only its algorithm and says how its edits are undone::

    @edit_method(FTHyperParams)
    def apply_ft_to_multimodal_model(ctx: EditContext, requests: list[dict]) -> Iterator[EditStats]:
        weight = ctx.adapter.layers(ctx.model)[ctx.hparams.layer].value.weight
        ctx.snapshot().add(weight)                   # restore policy: copy the matrix back
        for request in requests:                     # already normalised dicts
            ...                                      # the algorithm
            yield EditStats(steps=n, converged=ok)   # one record per request

The decorator turns that function into the EasyEdit apply of the same name and signature.

**The run of one apply** (:func:`run_apply`): ``HparamsCls.check_given(hparams)``; the adapter
(:func:`~mke_plugins.adapters.get_adapter`); the requests through
:func:`~mke_plugins.core.requests.normalize_requests` (a bare dict becomes a list; with
``fields`` each request is first cut down to the fields the algorithm may read); ``copy``; then
the algorithm inside an :class:`~mke_plugins.core.guard.EditGuard`. If anything raises
(``KeyboardInterrupt`` included) the method's own undo runs (what it registered on the context),
then the guard puts the model back, and the exception propagates.

**The restore policy** is what the algorithm registers on its :class:`EditContext` as it goes,
*before* it changes anything: :meth:`EditContext.snapshot` (exact copies of weights changed in
place), :meth:`EditContext.undo` (callables that remove what the edit added: hooks, side
modules, memory rows) and :meth:`EditContext.on_failure` (clean-up of a method's side tables
needed only when an edit stops half-way). The same registrations are the returned
``weights_copy`` (a :class:`~mke_plugins.core.snapshot.RestoreHandle`).

**The flags**, with the meaning EasyEdit main's own methods give them
(``easyeditor/models/{ft,lora,rome,grace,wise,serac,melo,...}/*_main.py``, read against
``editors/multimodal_editor.py`` and ``editors/utils.py:restore_after_edit``):

* ``copy`` — edit a deep copy of the model (``copy.deepcopy``, as EasyEdit's FT/LoRA/GRACE/WISE
  do) and return the copy: the model passed in is not touched. ``weights_copy`` then undoes the
  edit on the copy. EasyEdit's editors always pass ``copy=False``.
* ``return_orig_weights`` — whether ``weights_copy`` can undo the edit. True: it undoes exactly
  this call's edits (EasyEdit's FT/ROME fill it with the original tensors; ours restores on
  ``items()`` or when called). False: it is empty and restoring through it does nothing, so the
  edit stays on the model (EasyEdit's methods return ``{}``). EasyEdit's editors always pass
  True and restore after each single edit.
* ``keep_original_weight`` — EasyEdit passes the user's ``edit(keep_original_weight=...)``
  through and its methods disagree on what it means: FT, ROME, GRACE and WISE ignore it; LoRA
  reads True as "start a fresh adapter instead of training the one an earlier edit left"; SERAC
  as "forget earlier edits"; MEND and EMMET return an empty ``weights_copy`` when it is False
  (which would make EasyEdit's default single edits unrestorable). The rule here: it never
  changes what ``weights_copy`` holds (that is ``return_orig_weights``'s job) and never drops an
  earlier edit; each call's edit is undone by its own ``weights_copy`` either way. It reaches the
  algorithm as ``ctx.keep_original_weight`` for a method that wants LoRA's reading; none of the
  built-in methods does, so for them True and False make the same edit.

**Stats** have one declared shape: the algorithm gives one :class:`EditStats` per request
(``steps``, ``seconds``, ``converged``, ``added_bytes`` and method-specific ``extra`` values);
the apply puts them in an :class:`ApplyStats` on ``weights_copy.stats``, which is what
``mke-plugins bench`` reads.
"""

from __future__ import annotations

import copy as copy_module
import time
from dataclasses import dataclass, field
from typing import Any, Callable, ContextManager, Iterable, Mapping

import torch
from torch import nn

from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import VLMAdapter, unwrap_model

from .guard import EditGuard
from .replay import PrefixReplay, prefix_replay
from .requests import normalize_requests
from .snapshot import RestoreHandle, WeightSnapshot
from .wrap import GatedModel, gated

__all__ = ["ApplyStats", "EditContext", "EditStats", "edit_method", "gated_by", "run_apply", "tensor_bytes"]

#: the fields every :class:`EditStats` has; ``extra`` may not reuse these names
COMMON_FIELDS = ("steps", "seconds", "converged", "added_bytes")


# -- stats ---------------------------------------------------------------------------------------
@dataclass
class EditStats:
    """What one request's edit did.

    ``steps``: optimiser updates; ``seconds``: wall time of this edit (left ``None``, the template
    fills in the time since the previous record); ``converged``: the method's own stop rule was
    met (``None``: the method has none); ``added_bytes``: bytes the edit adds to the model (side
    weights, neurons, memory rows; 0 for edits made in place); ``extra``: method-specific
    JSON-serialisable values (numbers are averaged and labels counted in the bench row).
    """

    steps: int = 0
    seconds: float | None = None
    converged: bool | None = None
    added_bytes: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        clash = [k for k in self.extra if k in COMMON_FIELDS]
        if clash:
            raise ValueError(f"EditStats.extra reuses the common field(s) {clash}; set them as "
                             f"EditStats({clash[0]}=...) instead")

    def to_dict(self) -> dict[str, Any]:
        """The common fields, then ``extra``: one flat dict."""
        common = {k: getattr(self, k) for k in COMMON_FIELDS}
        return {**common, **self.extra}


@dataclass
class ApplyStats:
    """The stats of one apply call: which method, and one :class:`EditStats` per request, in order."""

    method: str
    edits: list[EditStats]

    @property
    def steps(self) -> int:
        return sum(e.steps for e in self.edits)

    @property
    def seconds(self) -> float:
        return sum(e.seconds or 0.0 for e in self.edits)

    @property
    def converged(self) -> bool | None:
        """True when every edit met its stop rule; ``None`` when the method has none."""
        flags = [e.converged for e in self.edits]
        return None if any(f is None for f in flags) else all(flags)

    @property
    def added_bytes(self) -> int:
        return sum(e.added_bytes for e in self.edits)

    def flat(self) -> dict[str, Any]:
        """One flat dict for a table row: the edit's own record when the call made one edit (the
        bench's case), else the totals of the common fields."""
        if len(self.edits) == 1:
            return self.edits[0].to_dict()
        return {k: getattr(self, k) for k in COMMON_FIELDS}

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, **{k: getattr(self, k) for k in COMMON_FIELDS},
                "edits": [e.to_dict() for e in self.edits]}


def tensor_bytes(tensors: Iterable[torch.Tensor | None]) -> int:
    """Bytes held by ``tensors`` (``None`` entries count 0): for :attr:`EditStats.added_bytes`."""
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


# -- the context an algorithm gets ------------------------------------------------------------------
@dataclass
class EditContext:
    """Everything an algorithm needs, and where it registers how its edits are undone.

    ``model`` is the model to edit, as passed in (possibly a ``GatedModel`` from an earlier edit)
    or its deep copy under ``copy=True``; ``base`` is the bare ``nn.Module`` under it.
    """

    method: str
    model: Any
    tok: Any
    hparams: Any
    adapter: VLMAdapter
    keep_original_weight: bool = False
    kwargs: dict[str, Any] = field(default_factory=dict)
    restore: RestoreHandle = field(default_factory=RestoreHandle)
    _failure: list[Callable[[], Any]] = field(default_factory=list)

    @property
    def base(self) -> nn.Module:
        return unwrap_model(self.model)

    def snapshot(self) -> WeightSnapshot:
        """A new :class:`WeightSnapshot` of the base model, part of ``weights_copy``: ``add`` what
        you are about to change in place."""
        snap = WeightSnapshot(self.base)
        self.restore.add_snapshot(snap)
        return snap

    def undo(self, fn: Callable[[], Any]) -> None:
        """Register ``fn`` to remove what the coming edit adds; part of ``weights_copy``, run latest
        first, and also when the apply fails (so it must tolerate a half-made edit)."""
        self.restore.add_undo(fn)

    def replay(self, start: int | None) -> ContextManager[PrefixReplay]:
        """An adapter for the block whose forward/loss re-run only decoder layers ``start..`` of this model
        (:mod:`~mke_plugins.core.replay`); ``None``, or hparams ``prefix_replay: false``, runs the full model."""
        return prefix_replay(self.adapter, self.model, start if getattr(self.hparams, "prefix_replay", True) else None)

    def on_failure(self, fn: Callable[[], Any]) -> None:
        """Register ``fn`` to run only if the apply fails, after the undo callables (latest first)."""
        self._failure.append(fn)

    def fail(self) -> None:
        """Undo everything registered (the template calls this when the algorithm raises)."""
        self.restore.restore()
        while self._failure:
            self._failure.pop()()


Algorithm = Callable[[EditContext, list[dict[str, Any]]], Iterable[EditStats]]
EditedModel = Callable[[EditContext], Any]


def gated_by(gate: str) -> EditedModel:
    """``edited_model`` for a hook-based method: the edited model with ``gate`` open on every call."""

    def view(ctx: EditContext) -> GatedModel:
        return gated(ctx.model, gate)

    return view


# -- the apply ---------------------------------------------------------------------------------------
def _view(requests: Any, fields: tuple[str, ...] | None) -> Any:
    """``requests`` with each dict cut down to ``fields`` (other shapes are left to normalize_requests)."""
    if fields is None:
        return requests

    def cut(req: Any) -> Any:
        return {k: req[k] for k in fields if k in req} if isinstance(req, Mapping) else req

    if isinstance(requests, Mapping):
        return [cut(requests)]
    if isinstance(requests, (list, tuple)):
        return [cut(r) for r in requests]
    return requests


def _records(method: str, algorithm: Algorithm, ctx: EditContext, requests: list[dict[str, Any]]) -> list[EditStats]:
    """Run the algorithm; stamp each record's missing ``seconds`` with the time since the previous one."""
    out: list[EditStats] = []
    t = time.perf_counter()
    for rec in algorithm(ctx, requests):
        if not isinstance(rec, EditStats):
            raise TypeError(f"{method}: the algorithm must give EditStats records, got {type(rec).__name__}")
        now = time.perf_counter()
        if rec.seconds is None:
            rec.seconds = now - t
        t = now
        out.append(rec)
    if len(out) != len(requests):
        raise RuntimeError(f"{method}: the algorithm gave {len(out)} EditStats records for {len(requests)} "
                           f"requests; give exactly one per request, in order")
    return out


def run_apply(algorithm: Algorithm, hparams_cls: type, model: Any, tok: Any, requests: Any, hparams: Any, *,
              copy: bool = False, return_orig_weights: bool = False, keep_original_weight: bool = False,
              fields: tuple[str, ...] | None = None, edited_model: EditedModel | None = None,
              **kwargs: Any) -> tuple[Any, RestoreHandle]:
    """One EasyEdit apply through ``algorithm`` (see the module docstring for every step and flag)."""
    method = getattr(hparams_cls, "ALG_NAME", hparams_cls.__name__)
    hparams_cls.check_given(hparams)
    adapter = get_adapter(model, hparams)
    reqs = normalize_requests(_view(requests, fields), adapter)
    if copy:
        model = copy_module.deepcopy(model)
    ctx = EditContext(method, model, tok, hparams, adapter, keep_original_weight, kwargs)
    with EditGuard(model), adapter.encoder_cache(model):  # each picture through the vision tower once per apply
        try:
            stats = ApplyStats(method, _records(method, algorithm, ctx, reqs))
            edited = edited_model(ctx) if edited_model is not None else model
        except BaseException:
            ctx.fail()
            raise
    handle = ctx.restore if return_orig_weights else RestoreHandle()
    handle.stats = stats
    return edited, handle


def edit_method(
    hparams_cls: type, *, fields: tuple[str, ...] | None = None, edited_model: EditedModel | None = None,
) -> Callable[[Algorithm], Callable[..., tuple[Any, RestoreHandle]]]:
    """Decorator: turn ``algorithm(ctx, requests)`` into EasyEdit's apply function of the same name.

    ``hparams_cls``: the method's hyperparameter class (its ``check_given`` runs first).
    ``fields``: the only request fields the algorithm may read (the rest are never touched);
    ``None`` keeps every field. ``edited_model``: what apply returns as ``edited_model``, built
    from the context after the edit (e.g. ``gated_by(GATE)`` for a hook-based method); by default
    the model that was edited. The returned function has EasyEdit's
    signature; the algorithm stays reachable as its ``.algorithm``, and ``.mke_guarded`` tells the
    EasyEdit bridge that the apply already runs inside an edit guard.
    """

    def wrap(algorithm: Algorithm) -> Callable[..., tuple[Any, RestoreHandle]]:
        def apply(model: Any, tok: Any, requests: Any, hparams: Any, copy: bool = False,
                  return_orig_weights: bool = False, keep_original_weight: bool = False,
                  **kwargs: Any) -> tuple[Any, RestoreHandle]:
            return run_apply(algorithm, hparams_cls, model, tok, requests, hparams, copy=copy,
                             return_orig_weights=return_orig_weights, keep_original_weight=keep_original_weight,
                             fields=fields, edited_model=edited_model, **kwargs)

        apply.__name__ = algorithm.__name__
        apply.__qualname__ = algorithm.__qualname__
        apply.__module__ = algorithm.__module__
        apply.__doc__ = algorithm.__doc__
        apply.algorithm = algorithm  # type: ignore[attr-defined]
        apply.mke_guarded = True  # type: ignore[attr-defined]  # runs its own EditGuard: the bridge adds none
        return apply

    return wrap
