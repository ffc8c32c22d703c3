"""core.routing: routed edits act on exactly the rows routed to them, at every position, in forward and generate."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mke_plugins.adapters import Query, get_adapter
from mke_plugins.core.deltas import ColumnDelta
from mke_plugins.core.hooks import capture, hook_counts
from mke_plugins.core.routing import RoutedEdit, RoutedModel, routed_edits
from mke_plugins.core.snapshot import assert_same_state, state_of
from mke_plugins.testing.images import make_image

pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def setup(tiny_model, tiny_dir):
    model, tok = tiny_model("qwen2-vl")
    adapter = get_adapter(model, SimpleNamespace(model_name=str(tiny_dir("qwen2-vl"))))
    own = Query([make_image(0)], "What is in the picture?", "a red circle")
    far = Query(None, "Count to three, slowly:", "one two three")
    return SimpleNamespace(model=model, tok=tok, adapter=adapter, own=own, far=far)


def _edit(s, threshold: float = 0.9999):
    """A routed edit keyed on ``own`` (its answer-predicting positions) with random offsets on layer 0."""
    store = routed_edits(s.model, s.adapter, route_layer=-1)
    b = s.adapter.batch(s.model, s.tok, [s.own])
    with torch.no_grad(), capture({"r": store.route_point}, positions=b.answer_mask) as rec:
        s.adapter.forward(s.model, b)
    idx = torch.tensor([0, 3, 5, 7])
    z = torch.randn(4, s.adapter.layers(s.model)[0].value.weight.shape[0], generator=torch.Generator().manual_seed(0))
    keys = torch.nn.functional.normalize(rec["r"].float(), dim=-1)
    store.add(RoutedEdit("e", keys, threshold, {0: (idx, z)}))
    return store, idx, z


def test_a_routed_edit_acts_on_its_rows_only_and_comes_off_exactly(setup):
    s = setup
    before, hooks = state_of(s.model), hook_counts(s.model)
    mixed = s.adapter.batch(s.model, s.tok, [s.own, s.far])
    with torch.no_grad():
        bare = s.adapter.forward(s.model, mixed)
    store, idx, z = _edit(s)
    value = s.adapter.layers(s.model)[0].value
    with torch.no_grad():
        with ColumnDelta(value, idx, init=z):  # the same offsets on every row
            always = s.adapter.forward(s.model, mixed)
        routed = s.adapter.forward(RoutedModel(s.model), mixed)
        assert torch.equal(s.adapter.forward(s.model, mixed), bare)  # the bare model runs no routed edit
    assert not torch.equal(always[0], bare[0])
    assert torch.equal(routed[0], always[0])  # routed row: the edit at every position
    assert torch.equal(routed[1], bare[1])  # the other row: bare logits, bit for bit
    store.remove("e")
    assert routed_edits(s.model, create=False) is None and hook_counts(s.model) == hooks
    assert_same_state(before, s.model)


def test_generate_routes_once_on_the_prompt_and_keeps_the_route(setup):
    s = setup
    store, idx, z = _edit(s)
    try:
        value = s.adapter.layers(s.model)[0].value
        routed = s.adapter.generate(RoutedModel(s.model), s.tok, s.own, max_new_tokens=4)
        with ColumnDelta(value, idx, init=z):
            always = s.adapter.generate(s.model, s.tok, s.own, max_new_tokens=4)
        bare = s.adapter.generate(s.model, s.tok, s.own, max_new_tokens=4)
        assert routed == always and always != bare
        assert s.adapter.generate(RoutedModel(s.model), s.tok, s.far, max_new_tokens=4) == \
            s.adapter.generate(s.model, s.tok, s.far, max_new_tokens=4)
    finally:
        store.remove("e")


def test_decide_takes_the_best_position_and_ignores_padding():
    from mke_plugins.core.routing import RoutedEdits

    store = RoutedEdits.__new__(RoutedEdits)  # decide() needs only the keys and the window
    store.window = 1
    store.edits = [SimpleNamespace(), SimpleNamespace()]
    store._keys = torch.eye(3)[:2]  # edit 0 keyed on axis 0, edit 1 on axis 1
    store._key_edit = torch.tensor([0, 1])
    store._thresholds = torch.tensor([0.9, 0.9])
    store.exclusive = False
    reps = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.1]],    # row 0: second position near edit 0
                         [[0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]])   # row 1: first position near edit 1, but padding
    valid = torch.tensor([[True, True], [False, True]])
    assert store.decide(reps, valid).tolist() == [[True, False], [False, False]]
    assert store.decide(reps, None).tolist() == [[True, False], [False, True]]


def test_exclusive_routing_gives_a_row_only_its_closest_admitted_edit():
    from mke_plugins.core.routing import RoutedEdits

    store = RoutedEdits.__new__(RoutedEdits)  # decide() needs only the keys and the window
    store.window = 1
    store.edits = [SimpleNamespace(), SimpleNamespace(), SimpleNamespace()]
    store._keys = torch.eye(3)
    store._key_edit = torch.tensor([0, 1, 2])
    store._thresholds = torch.tensor([0.5, 0.5, 0.5])
    reps = torch.tensor([[[1.0, 0.9, 0.0], [0.0, 1.0, 0.2]],    # row 0: edits 0 and 1 admit; edit 1 is closest
                         [[0.0, 0.0, 0.0], [0.1, 0.0, 0.0]]])   # row 1: only edit 0 admits (exactly one axis)
    store.exclusive = False
    assert store.decide(reps, None).tolist() == [[True, True, False], [True, False, False]]
    store.exclusive = True
    assert store.decide(reps, None).tolist() == [[False, True, False], [True, False, False]]
    valid = torch.tensor([[True, False], [True, True]])  # the closest position is padding: the next best wins
    assert store.decide(reps, valid).tolist() == [[True, False, False], [True, False, False]]


def test_a_routing_window_averages_each_position_with_the_ones_before_it():
    """window 2: a position's routing state is the mean of its own and the previous valid position's unit
    states; padding never enters a window, and the first valid position stands alone."""
    from mke_plugins.core.routing import RoutedEdits

    store = RoutedEdits.__new__(RoutedEdits)
    store.window = 2
    store.edits = [SimpleNamespace()]
    store._keys = torch.nn.functional.normalize(torch.tensor([[1.0, 1.0, 0.0]]), dim=-1)  # between axes 0 and 1
    store._key_edit = torch.tensor([0])
    store._thresholds = torch.tensor([0.9])
    store.exclusive = False
    reps = torch.tensor([[[1.0, 0.0, 0.0], [0.0, 3.0, 0.0]],    # each position alone: cosine 0.71
                         [[0.0, 5.0, 0.0], [1.0, 0.0, 0.0]]])   # the same, but its first position is padding
    valid = torch.tensor([[True, True], [False, True]])
    states = store.states(reps, valid)
    torch.testing.assert_close(states[0, 1], store._keys[0])  # the mean of two unit rows, made unit again
    torch.testing.assert_close(states[1, 1], torch.tensor([1.0, 0.0, 0.0]))  # padding is not averaged in
    assert store.decide(reps, valid).tolist() == [[True], [False]]
    store.window = 1
    assert store.decide(reps, valid).tolist() == [[False], [False]]  # no single position is close enough
