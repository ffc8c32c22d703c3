"""Neuron patches and gated models on tiny models (gated Qwen2-VL FFN, flattened OPT FFN)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from mke_plugins.adapters import Query, get_adapter
from mke_plugins.core.hooks import capture, hook_counts
from mke_plugins.core.modes import frozen
from mke_plugins.core.neurons import _REGISTRY, patches_for
from mke_plugins.core.snapshot import RestoreHandle, assert_same_state, state_of
from mke_plugins.core.wrap import GatedModel, gate_open, gated, is_gate_open, set_always_on
from mke_plugins.testing.images import make_image, make_lavis_image


@pytest.fixture(params=["qwen2-vl", "blip2"])
def fam(request, tiny_model, tiny_lavis, tiny_dir):
    family = request.param
    if family == "blip2":
        model, tok = tiny_lavis(family)
        q = Query(make_lavis_image(0), "What is in the picture?", "a red circle")
        hp = SimpleNamespace(model_name="blip2")
    else:
        model, tok = tiny_model(family)
        q = Query([make_image(0)], "What is in the picture?", "a red circle")
        hp = SimpleNamespace(model_name=str(tiny_dir(family)))
    adapter = get_adapter(model, hp)
    return SimpleNamespace(family=family, model=model, tok=tok, adapter=adapter, batch=adapter.batch(model, tok, [q]))


def test_block_delta_is_gated_exact_and_trainable(fam):
    model, adapter, batch = fam.model, fam.adapter, fam.batch
    before = state_of(model)
    with torch.no_grad():
        base = adapter.forward(model, batch)
    counts = hook_counts(model)
    patches = patches_for(model, adapter, gate="t-neurons")
    block = patches.add_block(-1, 3, tag="e1")
    info = adapter.layers(model)[-1]
    assert block.gated == info.gated and block.value.shape == (info.value.weight.shape[0], 3)
    with torch.no_grad(), gate_open(model, patches.gate):
        assert torch.equal(adapter.forward(model, batch), base)  # zero values: no change
    torch.manual_seed(0)
    with torch.no_grad():
        for p in block.parameters():
            p.normal_(0, 0.5)
    with torch.no_grad():
        assert torch.equal(adapter.forward(model, batch), base)  # gate closed: bare model untouched
        edited = GatedModel(model, [patches.gate])
        assert not torch.equal(adapter.forward(edited, batch), base)
    # the delta equals act(q) @ V^T at every position
    shape = tuple(batch.labels.shape)
    with torch.no_grad(), gate_open(model, patches.gate), \
            capture({"q": info.ffn_in, "out": info.ffn_out}, seq_shape=shape) as rec:
        adapter.forward(model, batch)
    with torch.no_grad(), capture({"out": info.ffn_out}, seq_shape=shape) as rec0:
        adapter.forward(model, batch)
    want = rec0["out"].float() + block.delta(rec["q"])
    torch.testing.assert_close(rec["out"].float(), want, atol=1e-5, rtol=1e-5)
    # gradients reach the block only
    with frozen(model), gate_open(model, patches.gate):
        adapter.loss(model, batch).backward()
    assert block.value.grad is not None and block.value.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.parameters())
    block.freeze()
    assert block.frozen and list(patches.parameters()) == []
    # never in the module tree; removal restores hooks and registry
    assert_same_state(before, model)
    assert "key" not in " ".join(n for n, _ in model.named_parameters()).split(".")
    handle = RestoreHandle(undo=[lambda: patches.remove_tag("e1")])
    handle()
    assert hook_counts(model) == counts and model not in _REGISTRY
    with torch.no_grad():
        assert torch.equal(adapter.forward(edited, batch), base)


def test_blocks_per_layer_and_independent_removal(fam):
    model, adapter = fam.model, fam.adapter
    counts = hook_counts(fam.model)
    patches = patches_for(model, adapter, gate="t2")
    b1 = patches.add_block(1, 2, tag="a")
    b2 = patches.add_block(1, 2, tag="b")
    b3 = patches.add_block(2, 4, tag="b")
    assert len(patches) == 3 and patches.blocks(layer=1) == [b1, b2] and patches.blocks(tag="b") == [b2, b3]
    patches.remove_block(b2)
    assert patches.blocks() == [b1, b3]
    patches.remove_tag("b")
    assert patches.blocks() == [b1] and patches_for(model, gate="t2", create=False) is patches
    patches.remove_all()
    assert patches_for(model, gate="t2", create=False) is None
    assert hook_counts(model) == counts


def test_gated_model_forwards_and_never_nests(fam):
    model, adapter, batch = fam.model, fam.adapter, fam.batch
    edited = gated(model, "g1")
    again = gated(edited, "g2")
    assert again.model is model and again.gates == ("g1", "g2")
    assert edited.config is model.config and list(edited.parameters())[0] is list(model.parameters())[0]
    assert edited.to("cpu") is edited and edited.eval() is edited
    seen = []
    h = model.register_forward_pre_hook(lambda m, a: seen.append(is_gate_open(model, "g1")))
    try:
        with torch.no_grad():
            adapter.forward(again, batch)
            adapter.forward(model, batch)
    finally:
        h.remove()
    assert seen == [True, False] and not is_gate_open(model, "g1")
    with pytest.raises(TypeError):
        edited(bogus_argument_for_forward=1)
    assert not is_gate_open(model, "g1")  # closed after an exception
    set_always_on(model, "g3")
    assert is_gate_open(model, "g3")
    set_always_on(model, "g3", False)
    assert not is_gate_open(model, "g3")
    out = adapter.generate(edited, fam.tok, batch.queries[0], max_new_tokens=2)
    assert isinstance(out, str)


def test_hf_gated_model_is_called_like_the_base(tiny_model):
    model, proc = tiny_model("qwen2-vl")
    adapter = get_adapter(model)
    batch = adapter.batch(model, proc, [Query([make_image(1)], "Which city?", "Paris")])
    edited = gated(model, "x")
    with torch.no_grad():
        assert torch.equal(edited(**batch.inputs).logits, model(**batch.inputs).logits)
        gen = edited.generate(**{k: v for k, v in batch.inputs.items()}, max_new_tokens=1, do_sample=False)
    assert gen.shape[1] == batch.inputs["input_ids"].shape[1] + 1


def test_an_input_scope_admits_only_positions_near_its_keys():
    """core.scope: cosine to the nearest key against the threshold; a scoped block is silent outside it."""
    from mke_plugins.core.neurons import NeuronBlock
    from mke_plugins.core.scope import InputScope

    g = torch.Generator().manual_seed(0)
    anchor = torch.randn(2, 8, generator=g)
    scope = InputScope.around(anchor * 3.0, 0.9)  # keys are unit rows: the scale does not matter
    near = anchor[0] + 0.05 * torch.randn(8, generator=g)
    far = torch.randn(8, generator=g)
    assert scope.cosine(anchor[1]).item() == pytest.approx(1.0, abs=1e-6)
    assert scope.admits(torch.stack([near, far])).tolist() == [True, bool(scope.cosine(far) > 0.9)]
    assert scope.nbytes == 2 * 8 * 4
    with pytest.raises(ValueError, match="cosine in"):
        InputScope.around(anchor, 1.0)

    block = NeuronBlock(8, 3, gated=False, act_fn=torch.nn.functional.relu)
    with torch.no_grad():
        block.key.copy_(torch.randn(3, 8, generator=g))
        block.bias.fill_(5.0)  # fires everywhere without a scope
        block.value.copy_(torch.randn(8, 3, generator=g))
    q = torch.stack([near, -anchor[0]]).unsqueeze(0)  # (1, 2, d): one position inside, one outside
    full = block.delta(q)
    block.scope = InputScope.around(anchor, 0.9)
    scoped = block.delta(q)
    assert torch.equal(scoped[0, 0], full[0, 0]) and full[0, 1].abs().sum() > 0
    assert torch.equal(scoped[0, 1], torch.zeros(8))
