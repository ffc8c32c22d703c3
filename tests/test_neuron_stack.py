"""core.neuron_stack: frozen neuron blocks evaluated as one give the per-block sum; the stack follows its blocks."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from mke_plugins.core.neuron_stack import FrozenStack, split_stack
from mke_plugins.core.neurons import NeuronBlock
from mke_plugins.core.scope import InputScope

D = 16


def _blocks(n_blocks: int, *, gated: bool, scoped: bool, seed: int = 0) -> list[NeuronBlock]:
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n_blocks):
        b = NeuronBlock(D, 1 + i % 3, gated=gated, act_fn=F.silu if gated else F.gelu, tag=i)
        with torch.no_grad():
            for p in b.parameters():
                p.copy_(torch.randn(p.shape, generator=gen))
        if scoped and i % 4 != 3:  # every fourth block has no scope: it acts everywhere
            b.scope = InputScope.around(torch.randn(1 + i % 2, D, generator=gen), 0.2 + 0.05 * (i % 5))
        out.append(b.freeze())
    return out


def _patched_tiny_model(tiny_model, tiny_dir, gate: str):
    """A tiny Qwen2-VL, its adapter, a one-picture batch, its last layer and empty neuron patches on ``gate``."""
    from types import SimpleNamespace

    from mke_plugins.adapters import Query, get_adapter
    from mke_plugins.core.neurons import patches_for
    from mke_plugins.testing.images import make_image

    model, tok = tiny_model("qwen2-vl")
    adapter = get_adapter(model, SimpleNamespace(model_name=str(tiny_dir("qwen2-vl"))))
    batch = adapter.batch(model, tok, [Query([make_image(0)], "What is in the picture?", "a red circle")])
    return model, adapter, batch, adapter.layers(model)[-1], patches_for(model, adapter, gate=gate)


def _small_block(patches, gen: torch.Generator, tag: int) -> NeuronBlock:
    """A two-neuron block on the last layer with small random parameters."""
    b = patches.add_block(-1, 2, tag=tag)
    with torch.no_grad():
        for p in b.parameters():
            p.copy_(0.05 * torch.randn(p.shape, generator=gen))
    return b


@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("scoped", [True, False])
def test_a_stack_gives_the_per_block_sum(gated, scoped):
    blocks = _blocks(12, gated=gated, scoped=scoped)
    q = torch.randn(3, 7, D, generator=torch.Generator().manual_seed(1), requires_grad=True)
    loop = sum(b.delta(q) for b in blocks)
    stack = FrozenStack(blocks)
    got = stack.delta(q)
    assert got.shape == loop.shape
    torch.testing.assert_close(got, loop, rtol=1e-5, atol=1e-5)
    if scoped:  # the scopes really decide: some positions are outside some blocks' scopes
        admitted = torch.stack([b.scope.admits(q) for b in blocks if b.scope is not None])
        assert admitted.any() and not admitted.all()
    # the stack is differentiable in its input (later edits train through it)
    (g_stack,) = torch.autograd.grad(got.sum(), q)
    (g_loop,) = torch.autograd.grad(loop.sum(), q)
    torch.testing.assert_close(g_stack, g_loop, rtol=1e-4, atol=1e-4)


def test_outside_every_scope_the_stack_adds_exactly_zero():
    blocks = _blocks(6, gated=True, scoped=True)
    blocks = [b for b in blocks if b.scope is not None]
    far = -torch.cat([b.scope.keys for b in blocks]).sum(0)  # a direction no key is near
    for b in blocks:
        b.scope = InputScope(b.scope.keys, 0.999)
    out = FrozenStack(blocks).delta(far.expand(2, 5, D))
    assert torch.equal(out, torch.zeros_like(out))


def test_exclusive_scopes_let_only_the_closest_admitting_block_act():
    """With every scope exclusive, each position gets exactly the block whose key is closest among those
    that admit it (the per-block sum of that block alone), and nothing where no scope admits."""
    from mke_plugins.core.scope import admitted_pairs

    blocks = [b for b in _blocks(12, gated=True, scoped=True) if b.scope is not None]
    for b in blocks:
        b.scope = InputScope.around(b.scope.keys, 0.1, exclusive=True)
    q = torch.randn(4, 9, D, generator=torch.Generator().manual_seed(3))
    flat = q.reshape(-1, D)
    cos = torch.stack([b.scope.cosine(flat) for b in blocks], 1)  # (P, blocks)
    inside = cos > 0.1
    assert (inside.sum(1) >= 2).any(), "some position must lie in several scopes for the test to mean anything"
    best = cos.masked_fill(~inside, -2.0).argmax(1)
    # the closest admitting block admits its position, so its own delta there is its whole contribution
    want = torch.stack([blocks[int(best[i])].delta(flat[i:i + 1]).squeeze(0) if inside[i].any() else torch.zeros(D)
                        for i in range(flat.shape[0])])
    got = FrozenStack(blocks).delta(q).reshape(-1, D)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    summed = FrozenStack([*blocks[:-1], _blocks(1, gated=True, scoped=True, seed=9)[0]])
    assert not summed.exclusive  # one non-exclusive scope: every admitting block acts, as without the switch
    keys = torch.cat([b.scope.keys for b in blocks])
    owner = torch.cat([torch.full((b.scope.keys.shape[0],), i) for i, b in enumerate(blocks)])
    rows, who = admitted_pairs(flat, keys, owner, torch.full((len(blocks),), 0.1), exclusive=True)
    assert rows.tolist() == inside.any(1).nonzero().flatten().tolist() and torch.equal(who, best[rows])


def test_the_stack_follows_its_blocks():
    blocks = _blocks(5, gated=True, scoped=True)
    live = NeuronBlock(D, 2, gated=True, act_fn=F.silu)  # still training: runs on its own
    stack, rest = split_stack([*blocks, live], None)
    assert stack is not None and stack.blocks == blocks and rest == [live]
    assert split_stack([*blocks, live], stack)[0] is stack  # nothing changed: reused
    live.freeze()
    grown, rest = split_stack([*blocks, live], stack)
    assert grown is not stack and grown.blocks == [*blocks, live] and rest == []
    with torch.no_grad():
        blocks[2].value.mul_(2.0)  # written in place: rebuilt
    assert split_stack([*blocks, live], grown)[0] is not grown
    again, _ = split_stack([*blocks, live], None)
    blocks[1].scope = None  # another scope: rebuilt
    assert split_stack([*blocks, live], again)[0] is not again
    assert split_stack(blocks[:1], None) == (None, blocks[:1])  # one block: never stacked, arithmetic unchanged
    blocks[0].value_extra = lambda: torch.zeros(D)  # a value that may change per call: never stacked
    stack, rest = split_stack(blocks, None)
    assert rest[0] is blocks[0] and stack is None


def test_the_layer_hook_runs_finished_blocks_as_one_stack(tiny_model, tiny_dir):
    """On a model: frozen blocks go through one stack, the training block on its own, and the
    output equals the block-by-block sum's."""
    from mke_plugins.core.hooks import capture
    from mke_plugins.core.wrap import gate_open

    model, adapter, batch, info, patches = _patched_tiny_model(tiny_model, tiny_dir, "t-stack")
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), capture({"q": info.ffn_in}) as rec:
        adapter.forward(model, batch)
    q = rec["q"][0]
    blocks = []
    for i in range(6):
        b = _small_block(patches, gen, i)
        if i < 5:
            b.scope = InputScope.around(q[[i, i + 3]], 0.9)
            b.freeze()
        blocks.append(b)
    try:
        with torch.no_grad(), gate_open(model, patches.gate), capture({"out": info.ffn_out}) as rec_s:
            adapter.forward(model, batch)
        slot = patches._slots[info.index]
        assert slot.stack is not None and slot.stack.blocks == blocks[:5]
        with torch.no_grad(), capture({"out": info.ffn_out}) as rec0:
            adapter.forward(model, batch)
        want = rec0["out"][0].float() + sum(b.delta(q) for b in blocks)
        torch.testing.assert_close(rec_s["out"][0].float(), want, rtol=1e-5, atol=1e-5)
    finally:
        patches.remove_all()


def test_a_validity_token_skips_the_full_check_until_it_changes():
    """Under one token the stack is taken as it is (no per-parameter reads); a new token re-checks in full."""
    from mke_plugins.core.neuron_stack import mutations

    blocks = _blocks(5, gated=True, scoped=True)
    stack, _ = split_stack(blocks, None, ("t", 1))
    assert stack is not None and stack.token == ("t", 1)
    with torch.no_grad():
        blocks[2].value.mul_(2.0)  # in place, behind the stack's back
    assert split_stack(blocks, stack, ("t", 1))[0] is stack  # same token: not re-read (documented)
    assert split_stack(blocks, stack, ("t", 2))[0] is not stack  # the next opening sees the write
    before = mutations()
    blocks[0].scope = None
    blocks[3].freeze()
    assert mutations() == before + 2  # the blocks' own API changes the token the patches pass


def test_the_layer_hook_checks_its_stack_once_per_gate_opening(tiny_model, tiny_dir, monkeypatch):
    """Through the patches: one full check per opening of the gate, however many forwards it spans; a write
    to a frozen block between openings, and a new scope within one, still reach the output."""
    from mke_plugins.core.hooks import capture
    from mke_plugins.core.neuron_stack import FrozenStack as Stack
    from mke_plugins.core.wrap import gate_open

    model, adapter, batch, info, patches = _patched_tiny_model(tiny_model, tiny_dir, "t-token")
    gen = torch.Generator().manual_seed(0)
    blocks = []
    for i in range(4):
        blocks.append(_small_block(patches, gen, i).freeze())
    checks = []
    real = Stack.matches
    monkeypatch.setattr(Stack, "matches", lambda self, bl: checks.append(1) or real(self, bl))

    def out() -> torch.Tensor:
        with torch.no_grad(), capture({"out": info.ffn_out}) as rec:
            adapter.forward(model, batch)
        return rec["out"][0].float()

    try:
        with gate_open(model, patches.gate):
            first = out()
            for _ in range(3):
                torch.testing.assert_close(out(), first)
        assert checks == []  # built on the first forward, then taken as it is under the same opening
        with torch.no_grad():
            blocks[1].value.mul_(3.0)
        with gate_open(model, patches.gate):
            second = out()
        assert len(checks) == 1 and not torch.allclose(second, first)  # the new opening re-checked and rebuilt
        with gate_open(model, patches.gate):
            out()
            blocks[0].scope = InputScope.around(torch.randn(1, blocks[0].key.shape[1], generator=gen), 0.99)
            third = out()  # a new scope inside the opening is a change the token sees
        assert not torch.allclose(third, second)
    finally:
        patches.remove_all()


def test_gate_openings_are_numbered_once_per_opening_and_never_reused():
    from torch import nn

    from mke_plugins.core.wrap import gate_open, gate_opening, gate_restore, set_always_on

    model = nn.Linear(2, 2)
    assert gate_opening(model, "g") is None  # closed
    with gate_open(model, "g"):
        first = gate_opening(model, "g")
        with gate_open(model, "g"):  # nested: the same opening
            assert gate_opening(model, "g") == first
    with gate_open(model, "g"):
        second = gate_opening(model, "g")
    gate_restore(model, None)  # the gate state is dropped and made again
    with gate_open(model, "g"):
        third = gate_opening(model, "g")
    assert len({first, second, third}) == 3 and None not in (first, second, third)
    set_always_on(model, "g")
    with gate_open(model, "g"):
        assert gate_opening(model, "g") is None  # always on: no opening spans calls
    set_always_on(model, "g", False)
