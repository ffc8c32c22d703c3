"""The method template (``mke_plugins.core.template``): the flags, the stats shape and the undo.

Every built-in method runs through the template, so these tests pin its contract with toy
algorithms on the bundled world model (FT's hyperparameters, for ``check_given``), and check the
one real difference a flag makes on a real method (FT): none for ``keep_original_weight``.
"""

from __future__ import annotations

import inspect
from typing import Any, Iterator

import pytest
import torch

from mke_plugins.bench.runner import method_extra
from mke_plugins.core.snapshot import assert_same_state, state_of
from mke_plugins.core.template import ApplyStats, EditContext, EditStats, edit_method, tensor_bytes
from mke_plugins.methods.baselines.ft.ft_hparams import FTHyperParams
from mke_plugins.methods.baselines.ft.ft_main import apply_ft_to_multimodal_model
from mke_plugins.testing.conformance import APPLY_PARAMS, _hooks, _same, _state, world_setup

SIDE_TABLE: list[str] = []  # what a toy method keeps outside the model


def _weight(ctx: EditContext) -> torch.Tensor:
    return ctx.adapter.layers(ctx.model)[0].value.weight


@edit_method(FTHyperParams)
def bump(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
    """Add 1 to one value matrix per request (an in-place edit, undone from a snapshot)."""
    weight = _weight(ctx)
    ctx.snapshot().add(weight)
    for i, _ in enumerate(requests):
        with torch.no_grad():
            weight.add_(1.0)
        yield EditStats(steps=1, converged=True, extra={"request": i, "keep": ctx.keep_original_weight})


class Boom(RuntimeError):
    pass


def _failing(exc: type[BaseException], order: list[str]):
    @edit_method(FTHyperParams)
    def fails(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
        weight = _weight(ctx)
        ctx.snapshot().add(weight)
        ctx.undo(lambda: (order.append("undo"), SIDE_TABLE.clear()))
        ctx.on_failure(lambda: order.append("on_failure"))
        with torch.no_grad():
            weight.mul_(3.0)
        SIDE_TABLE.append("half-made edit")
        ctx.base.register_forward_hook(lambda *a: None)
        ctx.base.note = "left behind"
        yield EditStats(steps=1)
        raise exc("stopped half-way")

    return fails


# -- copy ----------------------------------------------------------------------------------------
def test_copy_edits_a_copy_and_leaves_the_given_model_untouched() -> None:
    s = world_setup("FT")
    before = _state(s.model)
    edited, wc = bump(s.model, s.tok, s.requests[0], s.hparams, copy=True, return_orig_weights=True)
    _same(before, s.model)
    assert edited is not s.model
    changed = state_of(edited)
    wc()  # undoes the edit on the copy
    assert_same_state(before[0], edited)
    with pytest.raises(AssertionError):
        assert_same_state(changed, edited)


def test_without_copy_the_given_model_is_edited() -> None:
    s = world_setup("FT")
    before = _state(s.model)
    edited, wc = bump(s.model, s.tok, [s.requests[0]], s.hparams, return_orig_weights=True)
    assert edited is s.model
    with pytest.raises(AssertionError):
        _same(before, s.model)
    list(wc.items())  # EasyEdit's default restore path
    _same(before, s.model)


# -- return_orig_weights ---------------------------------------------------------------------------
def test_return_orig_weights_false_gives_an_empty_no_op_weights_copy() -> None:
    s = world_setup("FT")
    edited, wc = bump(s.model, s.tok, s.requests, s.hparams, return_orig_weights=False)
    after = state_of(s.model)
    assert dict(wc) == {} and list(wc.items()) == []
    wc()
    assert_same_state(after, s.model)  # the edit stays
    assert isinstance(wc.stats, ApplyStats) and len(wc.stats.edits) == 2  # stats come with it anyway


def test_return_orig_weights_true_undoes_this_call_only() -> None:
    s = world_setup("FT")
    before = _state(s.model)
    _, wc1 = bump(s.model, s.tok, s.requests[0], s.hparams, return_orig_weights=True)
    middle = state_of(s.model)
    _, wc2 = bump(s.model, s.tok, s.requests[1], s.hparams, return_orig_weights=True)
    wc2()
    assert_same_state(middle, s.model)
    wc2()  # twice is harmless
    assert_same_state(middle, s.model)
    wc1()
    _same(before, s.model)


# -- keep_original_weight ---------------------------------------------------------------------------
def test_keep_original_weight_reaches_the_algorithm() -> None:
    s = world_setup("FT")
    for flag in (False, True):
        _, wc = bump(s.model, s.tok, s.requests[0], s.hparams, return_orig_weights=True, keep_original_weight=flag)
        assert wc.stats.edits[0].extra["keep"] is flag
        wc()


def test_keep_original_weight_changes_neither_the_edit_nor_weights_copy() -> None:
    """Documented rule: it never empties weights_copy and never drops an earlier edit; FT ignores it."""
    edits = []
    for flag in (False, True):
        s = world_setup("FT")
        before = _state(s.model)
        torch.manual_seed(0)
        _, wc = apply_ft_to_multimodal_model(s.model, s.tok, s.requests[0], s.hparams, return_orig_weights=True,
                                             keep_original_weight=flag)
        edits.append(state_of(s.model))
        wc()
        _same(before, s.model)
    assert_same_state(edits[0], edits[1])


# -- stats ----------------------------------------------------------------------------------------
def test_stats_have_one_record_per_request_in_one_shape() -> None:
    s = world_setup("FT")
    _, wc = bump(s.model, s.tok, s.requests, s.hparams, return_orig_weights=True)
    stats = wc.stats
    assert isinstance(stats, ApplyStats) and stats.method == "FT"
    assert [e.extra["request"] for e in stats.edits] == [0, 1]
    assert all(isinstance(e.seconds, float) and e.seconds >= 0 for e in stats.edits)  # stamped by the template
    assert stats.steps == 2 and stats.converged is True and stats.added_bytes == 0
    assert stats.flat() == {"steps": 2, "seconds": stats.seconds, "converged": True, "added_bytes": 0}
    d = stats.to_dict()
    assert d["method"] == "FT" and [e["request"] for e in d["edits"]] == [0, 1]
    assert list(d["edits"][0])[:4] == ["steps", "seconds", "converged", "added_bytes"]
    wc()


def test_the_bench_reads_the_one_shape() -> None:
    s = world_setup("FT")
    _, wc = bump(s.model, s.tok, s.requests[0], s.hparams, return_orig_weights=True)
    extra = method_extra(wc)
    assert extra["steps"] == 1 and extra["converged"] is True and extra["request"] == 0 and "added_bytes" in extra
    assert method_extra({}) == {}  # EasyEdit's own methods attach nothing
    wc()


def test_edit_stats_rules() -> None:
    with pytest.raises(ValueError, match="steps"):
        EditStats(extra={"steps": 3})
    assert ApplyStats("X", [EditStats(converged=True), EditStats(converged=None)]).converged is None
    assert ApplyStats("X", [EditStats(converged=True), EditStats(converged=False)]).converged is False
    assert tensor_bytes([torch.zeros(3, dtype=torch.float32), None, torch.zeros(2, dtype=torch.float16)]) == 16


def test_a_wrong_number_of_records_is_an_error_and_undone() -> None:
    @edit_method(FTHyperParams)
    def one_short(ctx: EditContext, requests: list[dict[str, Any]]) -> list[EditStats]:
        ctx.snapshot().add(_weight(ctx))
        with torch.no_grad():
            _weight(ctx).add_(1.0)
        return [EditStats()]

    s = world_setup("FT")
    before = _state(s.model)
    with pytest.raises(RuntimeError, match="1 EditStats records for 2 requests"):
        one_short(s.model, s.tok, s.requests, s.hparams)
    _same(before, s.model)


# -- undo on failure --------------------------------------------------------------------------------
@pytest.mark.parametrize("exc", [Boom, KeyboardInterrupt])
def test_a_failed_apply_is_undone(exc: type[BaseException]) -> None:
    s = world_setup("FT")
    before, hooks = _state(s.model), _hooks(s.model)
    order: list[str] = []
    with pytest.raises(exc, match="half-way"):
        _failing(exc, order)(s.model, s.tok, s.requests, s.hparams, return_orig_weights=True)
    _same(before, s.model)
    assert _hooks(s.model) == hooks and not hasattr(s.model, "note")
    assert SIDE_TABLE == [] and order == ["undo", "on_failure"]


def test_a_bad_request_fails_before_the_algorithm_runs() -> None:
    ran = []

    @edit_method(FTHyperParams)
    def record(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
        ran.append(True)
        yield EditStats()

    s = world_setup("FT")
    with pytest.raises(Exception, match="target"):
        record(s.model, s.tok, [dict(s.requests[0], target="")], s.hparams)
    with pytest.raises(TypeError, match="FTHyperParams"):
        record(s.model, s.tok, s.requests, object())
    assert not ran


# -- shape of the apply -------------------------------------------------------------------------------
def test_the_decorated_function_is_easyedits_apply() -> None:
    params = inspect.signature(bump).parameters
    assert tuple(params)[:len(APPLY_PARAMS)] == APPLY_PARAMS
    assert all(params[f].default is False for f in ("copy", "return_orig_weights", "keep_original_weight"))
    assert bump.__name__ == "bump" and bump.algorithm.__name__ == "bump"
    assert apply_ft_to_multimodal_model.__name__ == "apply_ft_to_multimodal_model"


def test_fields_limit_what_the_algorithm_reads_and_edited_model_is_returned() -> None:
    seen = []

    class Trap(dict):
        def __getitem__(self, key: str) -> Any:
            if key not in ("prompt", "target", "image"):
                raise AssertionError(f"read {key!r}")
            return super().__getitem__(key)

    @edit_method(FTHyperParams, fields=("prompt", "target", "image"), edited_model=lambda ctx: ("view", ctx.model))
    def look(ctx: EditContext, requests: list[dict[str, Any]]) -> Iterator[EditStats]:
        seen.extend(sorted(r) for r in requests)
        yield EditStats()

    s = world_setup("FT")
    edited, _ = look(s.model, s.tok, [Trap(s.requests[0], locality_prompt="x")], s.hparams)
    assert seen == [["image", "prompt", "target"]] and edited == ("view", s.model)
