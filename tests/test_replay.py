"""Prefix replay (core.replay): the logits of a replayed pass are the full forward's, bit for bit,
for every family's tiny model; a changed prefix is caught; nothing is left on the model."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import Query
from mke_plugins.core.deltas import ColumnDelta, DeltaSet
from mke_plugins.core.guard import EditGuard
from mke_plugins.core.replay import StalePrefixError, prefix_replay, replay_watch
from mke_plugins.testing.images import native_image

pytestmark = pytest.mark.usefixtures("one_thread")

#: (family, start) whose layer chain is not plain: Qwen3-VL's deepstack adds vision features after layer 0
DECLINED = {("qwen3-vl", 0): "the model changes the state between layers 0 and 1"}
FAMILIES = ("qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision", "blip2", "minigpt4")


def _setup(family_model: Any, family: str) -> tuple[Any, Any, Any, Any]:
    model, tok, name = family_model(family)
    adapter = get_adapter(model, SimpleNamespace(model_name=name))
    queries = [Query(native_image(family, 1), "What is in the picture?", "a red square"),
               Query(None, "Where is the red square?", "on the left")]
    batch = adapter.batch(model, tok, queries)
    for p in model.parameters():  # as every method's loop has it (core.modes.frozen)
        p.requires_grad_(False)
    return model, tok, adapter, batch


def _hook_state(model: torch.nn.Module) -> list[int]:
    return [len(d) for m in model.modules() for d in (m._forward_hooks, m._forward_pre_hooks)]


@pytest.mark.parametrize("inside", (False, True), ids=("layer", "inside"))
@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_logits_are_the_full_forwards(family_model: Any, family: str, inside: bool) -> None:
    """``inside``: the parts of the start layer that run before its value module are served from the capture."""
    model, _tok, adapter, batch = _setup(family_model, family)
    n = len(adapter.layers(model))
    with torch.no_grad():
        adapter.forward(model, batch)  # transformers adds its output-capturing hooks on the first forward
    hooks = _hook_state(model)
    for start in range(n):
        infos = adapter.layers(model)
        deltas = DeltaSet([ColumnDelta(infos[start].value, [0, 3])])
        with torch.no_grad():
            next(deltas.parameters()).normal_(generator=torch.Generator().manual_seed(start))
        with replay_watch() as watch:
            with prefix_replay(adapter, model, start, inside=infos[start].value if inside else None) as fwd:
                deltas.install()
                try:
                    full = [adapter.forward(model, batch) for _ in range(2)]
                    got = [fwd.forward(model, batch) for _ in range(3)]
                finally:
                    deltas.remove()
        for g in got:
            assert torch.equal(g, full[0]), (family, start, (g - full[0]).abs().max())
        stats = watch[0]
        if (family, start) in DECLINED:  # every pass was the full model, and the reason says why
            assert stats.full == 3 and list(stats.reasons) == [DECLINED[family, start]], stats
        else:  # the chain is plain: two passes came from the cache
            assert (stats.captures, stats.replays, stats.full) == (1, 2, 0), stats
            assert (stats.memoized > 0) == inside, stats  # attention at least runs before the value module
    assert _hook_state(model) == hooks


@pytest.mark.parametrize("family", FAMILIES)
def test_replayed_answer_logits_are_the_adapters(family_model: Any, family: str) -> None:
    """``answer_logits`` through the replay (capture pass and replayed passes) equals the adapter's own,
    bit for bit, whether the adapter slices the answer rows before the LM head or gathers them after."""
    model, _tok, adapter, batch = _setup(family_model, family)
    with torch.no_grad():
        want = adapter.answer_logits(model, batch)
        with replay_watch() as watch, prefix_replay(adapter, model, 1) as fwd:
            got = [fwd.answer_logits(model, batch) for _ in range(3)]
    for g in got:
        assert torch.equal(g.logits, want.logits) and torch.equal(g.labels, want.labels), family
    if (family, 1) not in DECLINED:
        assert watch[0].replays == 2, watch[0]


@pytest.mark.parametrize("family", ("qwen2-vl", "llava-onevision", "blip2"))
def test_replay_is_used_above_the_first_layer(family_model: Any, family: str) -> None:
    """The families with a plain layer chain do replay (a test that cannot pass by always declining)."""
    model, _tok, adapter, batch = _setup(family_model, family)
    with replay_watch() as watch, prefix_replay(adapter, model, 1) as fwd:
        for _ in range(3):
            fwd.loss(model, batch)
    assert watch[0].replays == 2, watch[0]


def test_gradients_match_through_the_replay(family_model: Any) -> None:
    model, _tok, adapter, batch = _setup(family_model, "qwen2-vl")
    infos = adapter.layers(model)
    grads = []
    for use, inside in ((False, None), (True, None), (True, infos[2].value)):
        deltas = DeltaSet([ColumnDelta(infos[2].value, [1, 5])])
        with prefix_replay(adapter, model, 2 if use else None, inside=inside) as fwd:
            deltas.install()
            try:
                for _ in range(2):
                    loss = fwd.loss(model, batch)
                    (g,) = torch.autograd.grad(loss, list(deltas.parameters()))
            finally:
                deltas.remove()
        grads.append(g)
    assert torch.equal(grads[0], grads[1]) and torch.equal(grads[0], grads[2])


def test_a_written_prefix_is_caught(family_model: Any) -> None:
    model, _tok, adapter, batch = _setup(family_model, "qwen2-vl")
    infos = adapter.layers(model)
    with torch.no_grad():
        fwd_cm = prefix_replay(adapter, model, 2, strict=False)
        with fwd_cm as fwd:
            fwd.forward(model, batch)
            w = infos[0].value.weight
            saved = w.clone()
            w.mul_(1.5)  # below the replay layer: the cache must not be used
            try:
                got = fwd.forward(model, batch)
                assert torch.equal(got, adapter.forward(model, batch))
                assert fwd.stats.replays == 0 and fwd.stats.captures == 2
            finally:
                w.copy_(saved)
        with replay_watch(), prefix_replay(adapter, model, 2) as fwd:
            fwd.forward(model, batch)
            with pytest.raises(StalePrefixError, match="below the replay layer was written"):
                infos[1].value.weight.add_(0.0)
                fwd.forward(model, batch)


def test_a_written_part_of_the_start_layer_is_caught(family_model: Any) -> None:
    """With ``inside``, a write to the start layer's attention (served from the capture) captures again,
    or raises under the watch; the value module itself may change freely."""
    model, _tok, adapter, batch = _setup(family_model, "qwen2-vl")
    infos = adapter.layers(model)
    attn = [p for n, p in infos[2].layer.named_parameters() if "attn" in n][0]
    with torch.no_grad():
        with prefix_replay(adapter, model, 2, strict=False, inside=infos[2].value) as fwd:
            fwd.forward(model, batch)
            saved = attn.clone()
            attn.mul_(1.5)
            try:
                got = fwd.forward(model, batch)
                assert torch.equal(got, adapter.forward(model, batch))
                assert fwd.stats.replays == 0 and fwd.stats.captures == 2
            finally:
                attn.copy_(saved)
            fwd.forward(model, batch)  # captures again (the restore is a write too)
            infos[2].value.weight.add_(0.0)  # the edited module: not part of the memo
            fwd.forward(model, batch)
            assert (fwd.stats.captures, fwd.stats.replays) == (3, 1) and fwd.stats.memoized > 0
        with replay_watch(), prefix_replay(adapter, model, 2, inside=infos[2].value) as fwd:
            fwd.forward(model, batch)
            with pytest.raises(StalePrefixError, match="replay layer before the edited module was written"):
                attn.add_(0.0)
                fwd.forward(model, batch)


def test_inside_must_be_in_the_start_layer(family_model: Any) -> None:
    model, _tok, adapter, _batch = _setup(family_model, "qwen2-vl")
    infos = adapter.layers(model)
    with pytest.raises(ValueError, match="not a submodule of the replay's first decoder layer"):
        with prefix_replay(adapter, model, 2, inside=infos[1].value):
            pass


def test_trainable_prefix_or_training_mode_runs_the_full_model(family_model: Any) -> None:
    model, _tok, adapter, batch = _setup(family_model, "qwen2-vl")
    infos = adapter.layers(model)
    with prefix_replay(adapter, model, 2) as fwd:
        infos[1].value.weight.requires_grad_(True)
        for _ in range(2):
            fwd.forward(model, batch)
        assert fwd.stats.replays == 0 and "requires grad" in next(iter(fwd.stats.reasons))
    infos[1].value.weight.requires_grad_(False)
    model.train()
    try:
        with prefix_replay(adapter, model, 2) as fwd:
            fwd.forward(model, batch)
            assert fwd.stats.full == 1 and "training mode" in next(iter(fwd.stats.reasons))
    finally:
        model.eval()


def test_an_error_inside_leaves_the_model_as_it_was(family_model: Any) -> None:
    model, _tok, adapter, batch = _setup(family_model, "qwen2-vl")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    hooks = _hook_state(model)

    def boom(*_a: Any) -> None:
        raise RuntimeError("boom")

    handle = adapter.layers(model)[3].layer.register_forward_hook(boom)
    with pytest.raises(RuntimeError, match="boom"), EditGuard(model), prefix_replay(adapter, model, 2) as fwd:
        fwd.forward(model, batch)
    handle.remove()
    assert _hook_state(model) == hooks
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_the_template_context_opens_a_replay_unless_the_hparams_turn_it_off(family_model: Any) -> None:
    from mke_plugins.core.template import EditContext

    model, tok, adapter, batch = _setup(family_model, "qwen2-vl")
    for flag, start in ((True, 2), (False, None)):
        ctx = EditContext("X", model, tok, SimpleNamespace(prefix_replay=flag), adapter)
        with replay_watch() as watch, ctx.replay(2) as fwd:
            for _ in range(2):
                fwd.forward(model, batch)
        assert fwd.start == start and watch[0].replays == (1 if flag else 0)


def test_the_replay_is_the_adapter_everywhere_else(family_model: Any) -> None:
    model, _tok, adapter, batch = _setup(family_model, "qwen2-vl")
    with prefix_replay(adapter, model, 2) as fwd:
        assert [i.name for i in fwd.layers(model)] == [i.name for i in adapter.layers(model)]
        assert fwd.lm_head(model) is adapter.lm_head(model) and fwd.family == adapter.family
