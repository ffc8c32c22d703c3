"""The encoder cache and answer-position logits give exactly what the plain passes give.

For every family's tiny model: logits, loss and gradients with the cache equal those without it
bit for bit, the vision tower runs once per distinct picture (counted through a wrapper of the
tower's ``forward``), the cache stands aside while the tower is trainable, hooked or changed, and
nothing is left on the model when the context exits. ``answer_logits`` reproduces the full
logits, loss and gradients to float tolerance (the head runs on fewer rows, and a BLAS may pick
another kernel for them: on the world model the logits differ by ~4e-6) and accuracy and
success exactly.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mke_plugins.adapters import Query, get_adapter, unwrap_model
from mke_plugins.adapters.encoder_cache import active_cache
from mke_plugins.core.snapshot import assert_same_state, state_of
from mke_plugins.testing.images import native_image

pytestmark = pytest.mark.usefixtures("one_thread")

HF = ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision"]
LAVIS = ["blip2", "minigpt4"]
ALL = HF + LAVIS


def tower_of(model):
    base = unwrap_model(model)
    inner = getattr(base, "model", None)
    for name in ("visual", "vision_tower"):
        if inner is not None and getattr(inner, name, None) is not None:
            return getattr(inner, name)
    return base.visual_encoder


class Counter:
    """Counts calls of a module's forward through an instance attribute (not a hook: a hook makes
    the cache stand aside)."""

    def __init__(self, module):
        self.module, self.calls = module, 0
        original = module.forward

        def forward(*args, **kwargs):
            self.calls += 1
            return original(*args, **kwargs)

        module.forward = forward

    def remove(self):
        del vars(self.module)["forward"]


@pytest.fixture
def setup(family_model):
    def make(family):
        model, tok, name = family_model(family)
        return model, tok, get_adapter(model, SimpleNamespace(model_name=name))

    return make


def queries(family):
    """Picture 0 three times (ASAM's tiling), picture 3 once, one text-only row."""
    same = Query(native_image(family, 0), "What is in the picture?", "a red circle")
    return [same, same, same, Query(native_image(family, 3), "Which city is shown?", "Paris"),
            Query(None, "The capital of Italy is", "Rome")]


def passes(adapter, model, batch, weight):
    """logits, row losses and the gradient of the mean loss on ``weight`` (a decoder weight)."""
    weight.grad = None
    weight.requires_grad_(True)
    logits = adapter.forward(model, batch)
    rows = adapter.loss(model, batch, logits, reduction="row")
    rows.mean().backward()
    grad = weight.grad.clone()
    weight.grad = None
    weight.requires_grad_(False)
    return logits.detach(), rows.detach(), grad


@pytest.mark.parametrize("family", ALL)
def test_cache_is_exact_and_encodes_each_picture_once(family, setup):
    model, tok, adapter = setup(family)
    model.requires_grad_(False)
    weight = adapter.layers(model)[1].value.weight
    batch = adapter.batch(model, tok, queries(family))
    plain = passes(adapter, model, batch, weight)
    counter = Counter(tower_of(model))
    try:
        with adapter.encoder_cache(model) as cache:
            assert active_cache(unwrap_model(model)) is cache
            first = passes(adapter, model, batch, weight)
            rebuilt = adapter.batch(model, tok, queries(family))  # new tensors, same content
            second = passes(adapter, model, rebuilt, weight)
            one = adapter.batch(model, tok, queries(family)[:1])
            with torch.no_grad():
                single = adapter.forward(model, one)
        calls = counter.calls
    finally:
        counter.remove()
    for got in (first, second):
        for a, b in zip(plain, got, strict=True):
            assert torch.equal(a, b), family
    with torch.no_grad():
        assert torch.equal(single, adapter.forward(model, one))
    assert cache.stats.hits > 0
    assert calls == 2, (family, calls)  # two distinct pictures, each encoded once, alone
    assert active_cache(unwrap_model(model)) is None and cache.closed
    assert "forward" not in vars(tower_of(model))


@pytest.mark.parametrize("family", ALL)
def test_cache_stands_aside_for_a_trainable_or_hooked_tower(family, setup):
    model, tok, adapter = setup(family)
    model.requires_grad_(False)
    batch = adapter.batch(model, tok, queries(family)[:2])
    tower = tower_of(model)
    param = next(tower.parameters())
    with torch.no_grad():
        plain = adapter.forward(model, batch)
    counter = Counter(tower)
    try:
        with adapter.encoder_cache(model) as cache, torch.no_grad():
            param.requires_grad_(True)
            adapter.forward(model, batch)
            adapter.forward(model, batch)
            trainable_calls = counter.calls
            param.requires_grad_(False)
            handle = tower.register_forward_hook(lambda *a: None)
            adapter.forward(model, batch)
            hooked_calls = counter.calls - trainable_calls
            handle.remove()
            cached = adapter.forward(model, batch)
            before = counter.calls
            param.add_(0.5)  # an in-place change of the tower drops the entries
            changed = adapter.forward(model, batch)
            after = counter.calls - before
            param.sub_(0.5)
    finally:
        counter.remove()
    per_pass = 1 if family in HF else 2  # HF encodes a batch's pictures in one call, LAVIS per row
    assert trainable_calls == 2 * per_pass and hooked_calls == per_pass
    assert cache.stats.bypassed >= 3 and cache.stats.invalidated == 1 and after >= 1
    assert torch.equal(cached, plain)
    with torch.no_grad():
        param.add_(0.5)
        assert torch.equal(changed, adapter.forward(model, batch))
        param.sub_(0.5)


def close(a, b):
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ALL)
def test_answer_logits_reproduce_the_full_logits(family, setup):
    model, tok, adapter = setup(family)
    model.requires_grad_(False)
    weight = adapter.layers(model)[2].value.weight
    for eos in (False, True):
        batch = adapter.batch(model, tok, queries(family)[2:], append_eos=eos)
        full = adapter.forward(model, batch)
        ans = adapter.answer_logits(model, batch)
        assert ans.logits.shape == (int(batch.answer_mask.sum()), full.shape[-1])
        close(ans.logits, full[batch.answer_mask])
        assert torch.equal(ans.labels, batch.labels[batch.target_mask])
        for reduction in ("mean", "row"):
            close(ans.loss(reduction), adapter.loss(model, batch, full, reduction=reduction))
        assert torch.equal(ans.token_accuracy(), adapter.token_accuracy(full, batch))
        assert torch.equal(ans.success(), adapter.success(full, batch))
    grads = []
    for use_answers in (False, True):
        weight.requires_grad_(True)
        loss = (adapter.answer_logits(model, batch).loss() if use_answers else adapter.loss(model, batch))
        loss.backward()
        grads.append(weight.grad.clone())
        weight.grad = None
        weight.requires_grad_(False)
    close(grads[0], grads[1])


def test_an_apply_runs_inside_the_cache_and_leaves_the_model_as_it_was(setup):
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.ft.ft_main import apply_ft_to_multimodal_model

    model, tok, adapter = setup("qwen2-vl")
    hp = load_hparams("FT", "world")
    before = state_of(model)
    counter = Counter(tower_of(model))
    try:
        req = {"prompt": "What is in the picture?", "target": "a red circle", "image": native_image("qwen2-vl", 0)}
        _, restore = apply_ft_to_multimodal_model(model, tok, req, hp, return_orig_weights=True)
        restore.restore()
    finally:
        counter.remove()
    steps = restore.stats.steps
    assert steps > 1 and counter.calls == 1, (steps, counter.calls)
    assert_same_state(before, state_of(model))
    assert active_cache(unwrap_model(model)) is None


@pytest.mark.parametrize("family", HF)
def test_older_transformers_fall_back_to_the_plain_passes(family, setup, monkeypatch):
    """A transformers release without ``mm_encoder_outputs`` or boolean ``logits_to_keep`` (EasyEdit
    pins such a one): the cache runs the tower as usual and ``answer_logits`` gathers from the full
    logits, with the same values as the plain passes."""
    from mke_plugins.adapters import hf

    monkeypatch.setattr(hf, "_takes_encoder_outputs", lambda cls: False)
    monkeypatch.setattr(hf, "_takes_mask_logits_to_keep", lambda cls: False)
    model, tok, adapter = setup(family)
    model.requires_grad_(False)
    batch = adapter.batch(model, tok, queries(family))
    with torch.no_grad():
        full = adapter.forward(model, batch)
        counter = Counter(tower_of(model))
        try:
            with adapter.encoder_cache(model):
                cached = [adapter.forward(model, batch) for _ in range(2)]
                ans = adapter.answer_logits(model, batch)
            calls = counter.calls
        finally:
            counter.remove()
    assert all(torch.equal(c, full) for c in cached) and torch.equal(ans.logits, full[batch.answer_mask])
    # the tower ran in each of the 3 passes (one call per batch); a working cache would make it 2
    assert not adapter.answer_rows_only(model) and calls == 3
