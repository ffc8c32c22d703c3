"""The conformance kit: independent checks that any registered method (ours or a third party's)
keeps the plugin and EasyEdit contracts.

A plugin author's test is five lines::

    from mke_plugins.testing import parametrize_with_checks

    @parametrize_with_checks(["HelloFT"])
    def test_conformance(method, check):
        check(method)

Checks that edit run on the bundled world model with the method's ``world`` hyperparameters
(``model="..."`` picks another bundled YAML) and two world edit requests. Each check gets a
fresh copy of the model.
"""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys
import warnings
from dataclasses import dataclass, fields
from functools import lru_cache
from importlib import metadata
from typing import Any, Callable, Iterable

from mke_hooks import MethodSpec, MKEError

from ..hparams import is_hparams_class, read_yaml
from ..plugins import DEFAULT_PLUGINS, ENTRY_POINT_GROUP
from ..registry import MethodEntry, get_registry

APPLY_PARAMS = ("model", "tok", "requests", "hparams", "copy", "return_orig_weights",
                "keep_original_weight")


@dataclass
class Setup:
    """A model, its processor, hyperparameters and requests for the editing checks."""

    model: Any
    tok: Any
    hparams: Any
    requests: list[dict]
    prior: dict  # a third request, for an edit made before the checked ones (sequential editing)


@lru_cache(maxsize=1)
def _world() -> tuple[Any, Any, list[dict]]:
    from mke_plugins import world
    from mke_plugins.adapters import Query, get_adapter

    model, tok = world.load()
    requests = world.records("edit")[:3]
    # transformers registers some hooks lazily on the first forward: warm up before counting
    adapter = get_adapter(model)
    r = requests[0]
    adapter.forward(model, adapter.batch(model, tok, [Query(r["image"], r["prompt"], r["target"])]))
    return model, tok, requests


def world_setup(method: str, model_key: str = "world") -> Setup:
    from mke_plugins.hparams import load_hparams

    model, tok, requests = _world()
    return Setup(copy.deepcopy(model), tok, load_hparams(method, model_key),
                 [dict(r) for r in requests[:2]], dict(requests[2]))


def _state(model: Any) -> Any:
    """Bit-exact record of parameters (with ``requires_grad`` and ``.grad``), buffers, module names
    and every module's train/eval mode."""
    from mke_plugins.core.snapshot import state_of

    return state_of(model), [(n, m.training) for n, m in model.named_modules()]


def _same(before: Any, model: Any) -> None:
    from mke_plugins.core.snapshot import assert_same_state

    params, modules = before
    assert_same_state(params, model)
    now = [(n, m.training) for n, m in model.named_modules()]
    assert [n for n, _ in now] == [n for n, _ in modules], "modules were added or removed"
    changed = [n or "<model>" for (n, a), (_, b) in zip(modules, now, strict=True) if a != b]
    assert not changed, f"train/eval mode changed on {changed[:5]}"


def _hooks(model: Any) -> dict[str, int]:
    from mke_plugins.core.hooks import hook_counts

    return hook_counts(model)


def _entry(method: str) -> MethodEntry:
    return get_registry().get(method)


def _apply(entry: MethodEntry, s: Setup, requests: Any, **kw: Any) -> tuple[Any, Any]:
    from mke_plugins.easyedit import make_apply

    fn = make_apply(entry)
    out = fn(s.model, s.tok, requests, s.hparams, copy=False,
             return_orig_weights=kw.pop("return_orig_weights", True), **kw)
    assert isinstance(out, tuple) and len(out) == 2, \
        f"apply must return (edited_model, weights_copy), got {type(out).__name__}"
    return out


def _restore(weights_copy: Any, model: Any) -> None:
    """Restore through EasyEdit main's default path: iterate ``items()`` and copy back."""
    import torch

    with torch.no_grad():
        for name, value in weights_copy.items():
            p = model.get_parameter(name)
            p.copy_(value.to(device=p.device, dtype=p.dtype))


# -- checks ------------------------------------------------------------------------------
def check_spec_valid(method: str) -> None:
    entry = _entry(method)
    assert isinstance(entry.spec, MethodSpec)
    assert entry.spec.name == method, "registered name must equal the requested name exactly"
    assert entry.spec.summary, "give the method a one-line summary"
    entry.spec.resolved("apply_multimodal")
    entry.spec.resolved("hparams_cls")
    if entry.spec.trainer is not None:
        entry.spec.resolved("trainer")


def check_light_import(method: str) -> None:
    """Importing the plugin's module and building the registry imports no torch."""
    entry = _entry(method)
    module = entry.plugin.name if entry.plugin.builtin else \
        entry.plugin.entry_point.split("=", 1)[1].strip().split(":")[0]
    code = ("import sys, importlib; importlib.import_module(%r); "
            "from mke_plugins.registry import get_registry; get_registry(); "
            "heavy=[m for m in ('torch','transformers','easyeditor') if m in sys.modules]; "
            "print(','.join(heavy))") % module
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    heavy = out.stdout.strip()
    assert not heavy, f"importing plugin {module!r} imported {heavy}; use 'module:attr' references"


def check_hparams(method: str) -> None:
    entry = _entry(method)
    cls = entry.spec.resolved("hparams_cls")
    assert is_hparams_class(cls), "hparams_cls must be a dataclass with from_hparams(path)"
    missing = [f.name for f in fields(cls) if not f.metadata.get("help")]
    assert not missing, f"hparams fields without help: {missing}"
    models = entry.hparams_models()
    assert models, "ship at least one hparams/<model>.yaml"
    for model in models:
        path = entry.hparams_dir() / f"{model}.yaml"
        with warnings.catch_warnings():
            warnings.simplefilter("error", DeprecationWarning)  # bundled files use current spellings
            hp = cls.from_hparams(str(path))
        assert hp.alg_name == method, f"{path}: alg_name is {hp.alg_name!r}"
        assert set(read_yaml(path)) <= {f.name for f in fields(cls)}
        loaded = copy.deepcopy(hp.to_dict())
        cls.check_given(hp)  # normalize, field constraints, validate: none may change a loaded value
        assert hp.to_dict() == loaded, f"{path}: validate/normalize changed a loaded value"


def check_apply_signature(method: str) -> None:
    fn = _entry(method).spec.resolved("apply_multimodal")
    params = inspect.signature(fn).parameters
    names = list(params)
    assert tuple(names[:len(APPLY_PARAMS)]) == APPLY_PARAMS, \
        f"apply signature must start with {APPLY_PARAMS}, got {names}"
    assert any(p.kind is p.VAR_KEYWORD for p in params.values()), "apply must accept **kwargs"
    for flag in ("copy", "return_orig_weights", "keep_original_weight"):
        assert params[flag].default is False, f"{flag} must default to False"


def check_request_shapes(method: str) -> None:
    """A bare dict (EasyEdit's sequential mode) and a list both work."""
    for shape in ("dict", "list"):
        s = world_setup(method)
        before = _state(s.model)
        req = s.requests[0] if shape == "dict" else [s.requests[0]]
        edited, weights_copy = _apply(_entry(method), s, req, train_ds=None)
        assert edited is not None
        _restore(weights_copy, s.model)
        _same(before, s.model)


def check_exact_restore(method: str) -> None:
    """After one edit, EasyEdit's restore path leaves the model bit-identical; twice is harmless."""
    s = world_setup(method)
    before, hooks = _state(s.model), _hooks(s.model)
    edited, weights_copy = _apply(_entry(method), s, [s.requests[0]])
    assert weights_copy is not None, "return a restore object when return_orig_weights=True"
    _restore(weights_copy, s.model)
    _same(before, s.model)
    if callable(weights_copy):
        weights_copy()
    _restore(weights_copy, s.model)
    _same(before, s.model)
    assert _hooks(s.model) == hooks, "hooks were left on the model after restore"


def check_sequential(method: str) -> None:
    """Edits accumulate on the same model; restoring in reverse order returns to the original."""
    s = world_setup(method)
    before = _state(s.model)
    copies = [_apply(_entry(method), s, r)[1] for r in s.requests]
    for wc in reversed(copies):
        _restore(wc, s.model)
    _same(before, s.model)


class InjectedFault(RuntimeError):
    """The conformance kit's fault, raised from inside a forward pass."""


class _Fault:
    """Counts forward calls of the model's last decoder layer; raises ``exc`` on call number ``at``.

    Every edit runs the model forward, whatever its optimiser, so the N-th call lands part-way
    through an edit; the last decoder layer is on every path through the model.
    """

    def __init__(self, s: Setup, at: int | None = None, exc: type[BaseException] = InjectedFault) -> None:
        from mke_plugins.adapters import get_adapter

        self.layer = get_adapter(s.model, s.hparams).layers(s.model)[-1].layer
        self.at, self.exc, self.calls, self.fired = at, exc, 0, False

    def _hook(self, module: Any, args: Any) -> None:
        self.calls += 1
        if self.calls == self.at:
            self.fired = True
            raise self.exc(f"conformance kit: fault injected at forward call {self.at}")

    def __enter__(self) -> "_Fault":
        self.handle = self.layer.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc: Any) -> None:
        self.handle.remove()


def _edited_logits(s: Setup, edited: Any) -> Any:
    import torch

    from mke_plugins.adapters import Query, get_adapter

    adapter = get_adapter(s.model, s.hparams)
    r = s.requests[0]
    with torch.no_grad():
        return adapter.forward(edited, adapter.batch(s.model, s.tok, [Query(r["image"], r["prompt"], r["target"])]))


def _interrupt(entry: MethodEntry, s: Setup, at: int, exc: type[BaseException]) -> int:
    """Run the edit with a fault at forward call ``at``; returns the call it fired at.

    A method that caches per-model work (a memory bank built on the first edit) runs the model
    fewer times once the cache exists: when the edit ends before call ``at``, its own restore is
    used and the fault moves to the last call that edit made.
    """
    import torch

    for _ in range(2):
        torch.manual_seed(0)
        with _Fault(s, at, exc) as fault:
            try:
                _, weights_copy = _apply(entry, s, s.requests)
            except exc:
                pass
        if fault.fired:
            return at
        _restore(weights_copy, s.model)
        if callable(weights_copy):
            weights_copy()
        at = fault.calls
    raise AssertionError(f"the fault at forward call {at} did not fire ({fault.calls} calls this time)")


def check_interrupted_edit(method: str) -> None:
    """On a model that already carries one edit (EasyEdit's sequential mode), a fault part-way
    through an edit of two more requests (an exception, then Ctrl-C on the last forward) leaves the
    model exactly as it was before that apply: weights, ``.grad``, ``requires_grad``, train/eval
    modes, modules and hooks; and an edit made afterwards equals the same edit on a model that
    never saw a fault, so no half-made edit is left in a method's own tables either."""
    import torch

    entry = _entry(method)
    ref = world_setup(method)
    torch.manual_seed(0)
    _apply(entry, ref, [ref.prior])  # the earlier edit, kept
    torch.manual_seed(0)
    with _Fault(ref) as count:
        edited, _ = _apply(entry, ref, ref.requests)
    expected = _edited_logits(ref, edited)
    assert count.calls >= 2, f"the edit ran the model only {count.calls} time(s): nothing to interrupt"
    s = world_setup(method)
    torch.manual_seed(0)
    _apply(entry, s, [s.prior])
    before, hooks = _state(s.model), _hooks(s.model)
    for at, exc in ((max(1, count.calls // 3), InjectedFault), (count.calls, KeyboardInterrupt)):
        at = _interrupt(entry, s, at, exc)
        try:
            _same(before, s.model)
        except AssertionError as err:
            raise AssertionError(f"after {exc.__name__} at forward call {at} of {count.calls}: {err}") from None
        assert _hooks(s.model) == hooks, f"hooks were left on the model after {exc.__name__} at call {at}"
    torch.manual_seed(0)
    edited, _ = _apply(entry, s, s.requests)
    assert torch.equal(_edited_logits(s, edited), expected), \
        "an edit made after an interrupted one differs from the same edit on a model that saw no fault: " \
        "the interrupted edit left state behind (outside the model's weights)"


def check_bad_input(method: str) -> None:
    """Missing image field and empty target fail with messages naming the field."""
    for field_name, mutate in (("image", lambda r: r.pop("image")),
                               ("target", lambda r: r.__setitem__("target", ""))):
        s = world_setup(method)
        req = dict(s.requests[0])
        mutate(req)
        try:
            _apply(_entry(method), s, [req])
        except (MKEError, ValueError, KeyError, TypeError) as exc:
            assert field_name in str(exc), f"error for a bad {field_name!r} does not name it: {exc}"
        else:
            raise AssertionError(f"a request with a bad {field_name!r} was accepted")


def check_bridge_round_trip(method: str) -> None:
    from mke_plugins.easyedit import install, uninstall

    from .standin import new_host

    host = new_host()
    entry = _entry(method)
    report = install(host=host)
    try:
        if entry.shadows_easyedit:
            assert method in report.skipped
            return
        assert method in host.alg_dict.ALG_MULTIMODAL_DICT and method in report.injected
        if entry.spec.trainer is not None:
            assert method.upper() in host.alg_train_dict.ALG_TRAIN_DICT
    finally:
        uninstall()
    assert method not in host.alg_dict.ALG_MULTIMODAL_DICT


def check_entry_point(method: str) -> None:
    entry = _entry(method)
    if entry.plugin.builtin:
        assert entry.plugin.name in DEFAULT_PLUGINS
        return
    eps = [ep for ep in metadata.entry_points(group=ENTRY_POINT_GROUP) if ep.name == entry.plugin.name]
    assert eps, f"declare [project.entry-points.{ENTRY_POINT_GROUP}] in your pyproject"


CHECKS: dict[str, Callable[[str], None]] = {
    "spec_valid": check_spec_valid,
    "light_import": check_light_import,
    "hparams": check_hparams,
    "apply_signature": check_apply_signature,
    "request_shapes": check_request_shapes,
    "exact_restore": check_exact_restore,
    "sequential": check_sequential,
    "interrupted_edit": check_interrupted_edit,
    "bad_input": check_bad_input,
    "bridge_round_trip": check_bridge_round_trip,
    "entry_point": check_entry_point,
}


def parametrize_with_checks(methods: Iterable[str], checks: Iterable[str] | None = None):
    """``pytest.mark.parametrize("method,check", ...)`` over every (method, check) pair."""
    import pytest

    names = list(checks or CHECKS)
    params = [pytest.param(m, CHECKS[c], id=f"{m}-{c}") for m in methods for c in names]
    return pytest.mark.parametrize("method,check", params)
