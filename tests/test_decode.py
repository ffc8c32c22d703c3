"""DECODE: conformance, exactness (hook = fold, restore), scoring, every family, YAMLs, errors.

Fast by design: tiny models, few optimisation steps; the world-model checks use the world YAML
with a reduced step cap where the number of steps does not matter to what is checked.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
import torch

from mke_hooks import HparamsError, RequestError
from mke_plugins.adapters import Query, get_adapter
from mke_plugins.core.hooks import hook_counts
from mke_plugins.core.snapshot import WeightSnapshot, assert_same_state, state_of
from mke_plugins.methods.decode import decode_main, localize, offsets
from mke_plugins.methods.decode.decode_hparams import DECODEHyperParams
from mke_plugins.testing import parametrize_with_checks
from mke_plugins.testing.families import REAL_YAMLS
from mke_plugins.testing.images import native_image

HPARAMS_DIR = Path(decode_main.__file__).parent / "hparams"


def tiny_hparams(model_name: str, **kw: Any) -> DECODEHyperParams:
    base = dict(alg_name="DECODE", model_name=model_name, num_last_layers_excluded=1, topk_per_token=4,
                max_neurons_per_group=5, lr=5e-2, max_steps=4, early_stop_text=0.0, early_stop_image=0.0,
                early_stop_joint=0.0)
    base.update(kw)
    return DECODEHyperParams.from_config(base)


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture
def family_setup(family_model):
    """``family_setup(family)`` -> (model, tok, adapter, model_name)."""

    def make(family: str):
        model, tok, name = family_model(family)
        return model, tok, get_adapter(model, SimpleNamespace(model_name=name)), name

    return make


# -- the conformance kit ------------------------------------------------------------------------

@parametrize_with_checks(["DECODE"])
def test_conformance(method, check):
    check(method)


# -- exactness ----------------------------------------------------------------------------------

def test_hook_forward_equals_folded_weights(family_setup):
    model, tok, adapter, _ = family_setup("qwen2-vl")
    infos = adapter.layers(model)
    group = [(0, 3), (0, 17), (1, 5), (2, 40), (2, 41)]
    deltas = offsets.make_deltas(infos, group)
    gen = torch.Generator().manual_seed(0)
    for d in deltas.deltas:
        with torch.no_grad():
            d.Z.copy_(torch.randn(d.Z.shape, generator=gen) * 0.05)
    batch = adapter.batch(model, tok, [Query(native_image("qwen2-vl"), "What is shown?", "a red circle")],
                          append_eos=True)
    with torch.no_grad():
        plain = adapter.forward(model, batch).float()
        with deltas:
            hooked = adapter.forward(model, batch).float()
        deltas.fold(model, WeightSnapshot(model))
        folded = adapter.forward(model, batch).float()
    assert (hooked - plain).abs().max() > 1e-3  # the offsets do change the output
    rel = (hooked - folded).norm() / hooked.norm()
    assert rel <= 1e-5, f"hook-forward and folded-weight logits differ: rel err {rel:.2e}"


def world_requests(n: int) -> tuple[Any, Any, list[dict]]:
    from mke_plugins import world

    model, tok = world.load()
    return model, tok, [dict(r) for r in world.records("edit")[:n]]


def test_ten_sequential_edits_restore_in_reverse_bit_identically():
    from mke_plugins.hparams import load_hparams

    model, tok, requests = world_requests(10)
    hp = load_hparams("DECODE", "world", max_steps=6, early_stop_text=0.0, early_stop_image=0.0)
    before = state_of(model)
    handles = []
    for req in requests:
        edited, handle = decode_main.apply_decode_to_multimodal_model(model, tok, req, hp, return_orig_weights=True)
        assert edited is model
        handles.append(handle)
    assert state_of(model).keys() == before.keys()
    changed = [k for k, r in state_of(model).items() if not torch.equal(r.tensor, before[k].tensor)]
    assert changed and all(k.endswith(("down_proj.weight",)) for k in changed)
    for handle in reversed(handles):
        for _ in handle.items():  # EasyEdit's default restore path
            pass
    assert_same_state(before, model)


def test_return_orig_weights_false_gives_an_empty_handle(family_setup):
    model, tok, _, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, max_steps=1)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    _, handle = decode_main.apply_decode_to_multimodal_model(model, tok, req, hp)
    assert len(handle) == 0 and repr(handle).startswith("RestoreHandle(snapshots=0")


def test_model_state_flags_and_mode_are_put_back(family_setup):
    model, tok, _, name = family_setup("qwen2-vl")
    model.train()
    model.lm_head.weight.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    hp = tiny_hparams(name, max_steps=2)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    decode_main.apply_decode_to_multimodal_model(model, tok, req, hp)  # warm-up (transformers may add hooks once)
    hooks = hook_counts(model)
    decode_main.apply_decode_to_multimodal_model(model, tok, req, hp)
    assert model.training and all(m.training for m in model.modules())
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert hook_counts(model) == hooks


def test_bfloat16_model_edits_and_restores_bit_exactly(tiny_dir):
    from mke_plugins.testing.tiny import load_tiny

    path = tiny_dir("qwen2-vl")
    model, tok = load_tiny(path, dtype=torch.bfloat16)
    hp = tiny_hparams(str(path), max_steps=3, dtype="bfloat16")
    before = state_of(model)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    _, handle = decode_main.apply_decode_to_multimodal_model(model, tok, req, hp, return_orig_weights=True)
    changed = [k for k, r in state_of(model).items() if not torch.equal(r.tensor, before[k].tensor)]
    assert changed and all(state_of(model)[k].dtype == torch.bfloat16 for k in changed)
    handle()
    assert_same_state(before, model)


# -- scoring ------------------------------------------------------------------------------------

def test_scores_match_brute_force(family_setup):
    """s_i(j) = a_i(x_{p_j}) · (U W_val)[y_j, i], computed the slow way (vocab × d_ff) in the test only."""
    model, tok, adapter, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, num_last_layers_excluded=0)
    infos = adapter.layers(model)
    stage = localize.build_stage_input(adapter, model, tok, Query(None, "The capital of Italy is", "Rome Paris"), hp)
    localize.reference_pass(adapter, model, stage, infos)
    scores = localize.neuron_scores(adapter, model, stage, infos)
    assert len(stage.answer_ids) >= 2
    # brute force: capture every position's activations, materialise U·W for each layer
    acts_all = {}
    hooks = [info.value.register_forward_pre_hook(
        lambda m, a, i=info.index: acts_all.__setitem__(i, a[0].detach().clone())) for info in infos]
    with torch.no_grad():
        adapter.forward(model, stage.batch)
    for h in hooks:
        h.remove()
    positions = stage.answer_pos[0].nonzero().flatten().tolist()
    head = adapter.lm_head(model).weight.float()
    for info in infos:
        full = head @ info.value.weight.float()  # (V, d_ff): only here
        for j, (p, y) in enumerate(zip(positions, stage.answer_ids, strict=True)):
            want = acts_all[info.index][0, p].float() * full[y]
            torch.testing.assert_close(scores[info.index][j], want, rtol=1e-5, atol=1e-6)
    # the selection is the per-position top-k over all layers, union with max, capped by score
    k, cap = 3, 4
    chosen = localize.select_neurons(scores, k, cap, "score")
    flat = [(float(scores[layer][j, i]), layer, i, j) for layer in scores for j in range(scores[layer].shape[0])
            for i in range(scores[layer].shape[1])]
    union: dict[tuple[int, int], float] = {}
    for j in range(len(positions)):
        top = sorted([f for f in flat if f[3] == j], key=lambda f: (-f[0], f[1], f[2]))[:k]
        for s, layer, i, _ in top:
            union[(layer, i)] = max(union.get((layer, i), -1e30), s)
    want = sorted(sorted(union.items(), key=lambda kv: (-kv[1], kv[0]))[:cap])
    assert list(chosen) == [n for n, _ in want]
    by_index = localize.select_neurons(scores, k, cap, "index")
    assert list(by_index) == sorted(union)[:cap]


def test_selection_ties_positions_and_truncation():
    s = {0: torch.tensor([[1.0, 5.0, 5.0], [2.0, 0.0, 9.0]]), 1: torch.tensor([[5.0, 0.0, 0.0], [9.0, 0.0, 0.0]])}
    # position 0: three 5.0s, ties by (layer, index) -> (0,1), (0,2); position 1: (0,2)=9 and (1,0)=9
    assert list(localize.select_neurons(s, 2, 10, "score")) == [(0, 1), (0, 2), (1, 0)]
    assert localize.select_neurons(s, 2, 10, "score")[(0, 2)] == 9.0  # max over positions
    assert list(localize.select_neurons(s, 2, 2, "score")) == [(0, 2), (1, 0)]  # highest scores
    assert list(localize.select_neurons(s, 2, 2, "index")) == [(0, 1), (0, 2)]  # lowest (layer, index)
    # a repeated token at two positions is two candidate lists (keyed by position, not token id)
    rep = {0: torch.tensor([[3.0, 1.0, 0.0], [0.0, 1.0, 3.0]])}
    assert list(localize.select_neurons(rep, 1, 10, "score")) == [(0, 0), (0, 2)]


def test_groups_and_stage_plans():
    nt, ni = {(0, 1): 1.0, (1, 2): 1.0}, {(1, 2): 2.0, (2, 3): 1.0}
    assert localize.groups(nt, ni, "overlap") == ([(0, 1), (1, 2)], [(1, 2), (2, 3)])
    assert localize.groups(nt, ni, "disjoint") == ([(0, 1), (1, 2)], [(2, 3)])
    assert localize.jaccard(nt, ni) == pytest.approx(1 / 3)
    loc = localize.Localization([0, 1, 2], "T", "I", "P", nt, ni, [(0, 1), (1, 2)], [(2, 3)])
    hp = DECODEHyperParams()
    assert [(n, s) for n, s, _ in offsets.plan_stages(loc, hp)] == [("text", "T"), ("image", "I")]
    hp.stage_order = "image_first"
    assert [(n, s) for n, s, _ in offsets.plan_stages(loc, hp)] == [("image", "I"), ("text", "T")]
    hp.stage_order = "joint"
    assert offsets.plan_stages(loc, hp) == [("joint", "P", [(0, 1), (1, 2), (2, 3)])]


def test_kl_loss_is_the_mean_prompt_position_kl(monkeypatch):
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(1, 6, 11, generator=gen)
    kl_pos = torch.tensor([[False, True, True, True, False, False]])
    ref_logits = torch.randn(1, 6, 11, generator=gen)
    stage = localize.StageInput(None, None, None, [], kl_pos,
                                ref_logprobs=torch.log_softmax(ref_logits[kl_pos], -1))
    want = torch.nn.functional.kl_div(torch.log_softmax(logits[kl_pos], -1), stage.ref_logprobs,
                                      log_target=True, reduction="batchmean")
    torch.testing.assert_close(offsets.kl_loss(logits, stage), want)
    monkeypatch.setattr(offsets, "kl_chunk", lambda vocab: 1)  # position chunks give the same value
    torch.testing.assert_close(offsets.kl_loss(logits, stage), want)
    stage.ref_logprobs = torch.log_softmax(logits[kl_pos], -1)
    assert offsets.kl_loss(logits, stage).abs() < 1e-6


def test_analysed_layers():
    hp = DECODEHyperParams()
    assert localize.analysed_layers(32, hp) == list(range(29))
    hp.layers = [5, 2]
    assert localize.analysed_layers(32, hp) == [2, 5]
    hp.layers = [40]
    with pytest.raises(HparamsError, match="'layers'"):
        localize.analysed_layers(32, hp)
    hp.layers, hp.num_last_layers_excluded = None, 4
    with pytest.raises(HparamsError, match="'num_last_layers_excluded'"):
        localize.analysed_layers(4, hp)


# -- requests (the stage table of the DECODE README) ----------------------------------------

def test_stage_queries_follow_the_optional_fields():
    img = object()
    base = {"prompt": "P", "target": "y", "image": img}
    q = localize.stage_queries(base)
    assert q.text == Query(None, "P", "y") and q.image == Query(img, "P", "y") and q.paired == Query(img, "P", "y")
    q = localize.stage_queries({**base, "text_only_prompt": "T", "image_only_prompt": "I"})
    assert q.text == Query(None, "T", "y") and q.image == Query(img, "I", "y")
    q = localize.stage_queries({**base, "text_only_prompt": "", "image_only_prompt": "I"})
    assert q.text == Query(None, "P", "y") and q.image == Query(img, "I", "y")
    q = localize.stage_queries({**base, "text_only_prompt": "T", "image": None})
    assert q.text == Query(None, "T", "y") and q.image is None


def test_plain_easyedit_request_and_text_only_request(family_setup):
    model, tok, adapter, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, max_steps=2)
    plain = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    res = offsets.run_decode(model, tok, [plain], hp, adapter=adapter)
    rep = res.reports[0]
    assert [s.name for s in rep.stages] == ["text", "image"] and all(s.steps == 2 for s in rep.stages)
    assert 0 < rep.g_text_size <= 5 and 0 < rep.g_image_size <= 5
    assert all(layer < 3 for layer, _ in rep.n_text + rep.n_image)  # last layer excluded
    res = offsets.run_decode(model, tok, [{**plain, "image": None}], hp, adapter=adapter)
    stages = res.reports[0].stages
    assert stages[0].name == "text" and stages[0].steps == 2 and stages[1].skipped


def test_early_stop_leaves_weights_untouched(family_setup):
    model, tok, adapter, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, early_stop_text=1e9, early_stop_image=1e9)
    before = state_of(model)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    res = offsets.run_decode(model, tok, [req], hp, adapter=adapter)
    assert all(s.early_stopped and s.steps == 0 for s in res.reports[0].stages)
    assert_same_state(before, model)


# -- every family -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision", "blip2", "minigpt4"])
def test_one_edit_on_every_family(family, family_setup):
    model, tok, adapter, name = family_setup(family)
    hp = tiny_hparams(name, max_steps=3)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image(family),
           "text_only_prompt": "What is the capital of Italy?", "image_only_prompt": "What city is in the picture?"}
    batch = adapter.batch(model, tok, [Query(req["image"], req["image_only_prompt"], "Rome")], append_eos=True)
    with torch.no_grad():
        loss0 = adapter.loss(model, batch)
    before = state_of(model)
    edited, handle = decode_main.apply_decode_to_multimodal_model(model, tok, [req], hp, return_orig_weights=True)
    with torch.no_grad():
        loss1 = adapter.loss(edited, batch)
    assert loss1 < loss0, f"{family}: the image-stage loss did not fall ({loss0:.3f} -> {loss1:.3f})"
    handle()
    assert_same_state(before, model)




@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision", "blip2", "minigpt4"])
def test_lifelong_mode_routes_kept_apart_edits_on_every_family(family, family_setup):
    """route_threshold: no weight is written, the edit acts through the RoutedModel on its own input,
    an input far from it gets the bare model's logits bit for bit, and restore removes every hook."""
    from mke_plugins.core.routing import RoutedModel, routed_edits

    model, tok, adapter, name = family_setup(family)
    # tiny random models give every position nearly the same late-layer state: a threshold this close to 1
    # admits the edit's own input (cosine 1 to its key) and nothing else
    hp = tiny_hparams(name, max_steps=3, route_threshold=0.9999, route_exclusive=True)
    reqs = [{"prompt": "What is shown?", "target": "Rome", "image": native_image(family)},
            {"prompt": "Which river is this?", "target": "Nile", "image": native_image(family)}]
    own = adapter.batch(model, tok, [Query(reqs[0]["image"], reqs[0]["prompt"], "Rome")])
    far = adapter.batch(model, tok, [Query(None, "Count to three, slowly and out loud:", "one two")])
    with torch.no_grad():
        loss0, far0 = adapter.loss(model, own), adapter.forward(model, far)
    before, hooks = state_of(model), hook_counts(model)
    e1, h1 = decode_main.apply_decode_to_multimodal_model(model, tok, reqs[:1], hp, return_orig_weights=True)
    from mke_plugins.methods.decode.routed import route_keys

    store = routed_edits(model, create=False)  # a new edit trains with the earlier edits its queries reach
    assert route_keys(adapter, model, tok, reqs[0], store)[1].tolist() == [[True]]
    assert route_keys(adapter, model, tok, reqs[1], store)[1].tolist() == [[False]]
    e2, h2 = decode_main.apply_decode_to_multimodal_model(e1, tok, reqs[1:], hp, return_orig_weights=True)
    assert isinstance(e2, RoutedModel) and e2.model is model
    assert_same_state(before, model)  # nothing folded
    store = routed_edits(model, create=False)
    assert len(store.edits) == 2 and h1.stats.edits[0].added_bytes == store.edits[0].nbytes > 0
    assert store.exclusive and all(e.exclusive for e in store.edits)
    with torch.no_grad():
        assert adapter.loss(e2, own) < loss0, f"{family}: the routed edit does not act on its own input"
        assert torch.equal(adapter.loss(model, own), loss0)  # the bare model runs no edit
        assert torch.equal(adapter.forward(e2, far), far0)  # routed off: the bare logits exactly
    h1()  # out of order
    assert len(store.edits) == 1
    h2()
    assert routed_edits(model, create=False) is None and hook_counts(model) == hooks
    assert_same_state(before, model)


def test_a_routing_window_keys_and_routes_alike_and_one_model_keeps_one_window(family_setup):
    """route_window 2: the keys are windowed as inputs are, so the edit still meets its own input and leaves a far
    one bit-identical; a later edit asking for another window is refused before it starts, with nothing changed."""
    from mke_plugins.core.routing import routed_edits

    model, tok, adapter, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, max_steps=3, route_threshold=0.9999, route_exclusive=True, route_window=2)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    own = adapter.batch(model, tok, [Query(req["image"], req["prompt"], "Rome")])
    far = adapter.batch(model, tok, [Query(None, "Count to three, slowly and out loud:", "one two")])
    with torch.no_grad():
        loss0, far0 = adapter.loss(model, own), adapter.forward(model, far)
    before = state_of(model)
    e1, h1 = decode_main.apply_decode_to_multimodal_model(model, tok, [req], hp, return_orig_weights=True)
    store = routed_edits(model, create=False)
    assert store.window == 2 and len(store.edits) == 1
    with torch.no_grad():
        assert adapter.loss(e1, own) < loss0
        assert torch.equal(adapter.forward(e1, far), far0)
    other = tiny_hparams(name, max_steps=3, route_threshold=0.9999, route_exclusive=True)
    with pytest.raises(ValueError, match="route_window 2"):
        decode_main.apply_decode_to_multimodal_model(e1, tok, [dict(req, target="Paris")], other)
    assert len(store.edits) == 1 and routed_edits(model, create=False) is store
    h1()
    assert routed_edits(model, create=False) is None
    assert_same_state(before, model)


def test_lifelong_mode_failing_half_way_leaves_no_routed_edit(family_setup, monkeypatch):
    from mke_plugins.core.routing import routed_edits

    model, tok, adapter, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, max_steps=3, route_threshold=0.9)
    reqs = [{"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")},
            {"prompt": "Which river is this?", "target": "Nile", "image": native_image("qwen2-vl")}]
    before, hooks = state_of(model), hook_counts(model)
    real, calls = offsets.train_stage, []

    def failing(*a, **k):
        calls.append(1)
        if len(calls) == 3:  # the second edit's first stage
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(offsets, "train_stage", failing)
    with pytest.raises(KeyboardInterrupt):
        decode_main.apply_decode_to_multimodal_model(model, tok, reqs, hp)
    assert routed_edits(model, create=False) is None and hook_counts(model) == hooks
    assert_same_state(before, model)


@pytest.mark.parametrize("exclusive", [False, True])
def test_a_new_routed_edit_trains_with_the_earlier_edits_its_queries_reach(family_setup, monkeypatch, exclusive):
    """Without route_exclusive, an earlier edit that the new edit's queries reach stays in force while the new
    one trains (they will act together); with it, the new edit trains on the bare model, since its own
    queries will meet only itself."""
    from mke_plugins.core.routing import RoutedEdits

    model, tok, adapter, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, max_steps=2, route_threshold=0.9999, route_exclusive=exclusive)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    e1, h1 = decode_main.apply_decode_to_multimodal_model(model, tok, [req], hp, return_orig_weights=True)
    real, seen = RoutedEdits.routed, []

    def recording(self, decision):
        seen.append(decision.clone())
        return real(self, decision)

    monkeypatch.setattr(RoutedEdits, "routed", recording)
    e2, h2 = decode_main.apply_decode_to_multimodal_model(e1, tok, [dict(req, target="Paris")], hp,
                                                         return_orig_weights=True)
    in_force = any(bool(d[:, 0].any()) for d in seen)
    assert in_force is not exclusive
    h2()
    h1()


def test_bundled_yamls_are_the_expected_set():
    assert sorted(p.stem for p in HPARAMS_DIR.glob("*.yaml")) == sorted([*REAL_YAMLS, "world", "lifelong"])


@pytest.mark.parametrize("yaml_name", sorted(REAL_YAMLS))
def test_real_family_yaml_matches_same_family_tiny_model(yaml_name, family_setup):
    family, n_real = REAL_YAMLS[yaml_name][:2]
    pattern = REAL_YAMLS[yaml_name].value
    path = HPARAMS_DIR / f"{yaml_name}.yaml"
    hp = DECODEHyperParams.from_hparams(path)
    assert pattern in path.read_text(), f"{path}: its header comment should name the value module {pattern}"
    # the YAML's family marker picks the same adapter as the tiny model of the family
    model, tok, tiny_adapter, _ = family_setup(family)
    assert get_adapter(None, hp).family == tiny_adapter.family
    # its layer choice is valid on the real model: non-empty, in range, the last layers excluded
    layers = localize.analysed_layers(n_real, hp)
    if hp.layers is None:
        assert layers == list(range(n_real - hp.num_last_layers_excluded))
    assert layers and all(0 <= i < n_real for i in layers)
    # the tiny model of the family resolves every value module under the documented name, with the
    # (d_model, d_ff) weight the scorer projects against the lm_head rows
    names = {id(m): n for n, m in model.named_modules()}
    head = tiny_adapter.lm_head(model)
    for info in tiny_adapter.layers(model):
        assert names[id(info.value)] == pattern.format(i=info.index) == info.value_name
        assert info.value.weight.shape[0] == head.weight.shape[1]
        assert info.value_in.module is info.value and info.value_in.where == "input"
    assert hp.topk_per_token == 40 and hp.max_neurons_per_group == 40 and hp.num_last_layers_excluded == 3


# -- errors name the field ----------------------------------------------------------------------

@pytest.mark.parametrize("key,value", [("truncate_by", "rank"), ("group_mode", "shared"),
                                       ("stage_order", "text_last"), ("topk_per_token", 0),
                                       ("max_neurons_per_group", -1), ("lr", 0), ("layers", [1, 1]),
                                       ("kl_weight", -0.5), ("max_steps", -1)])
def test_bad_hparams_name_the_field(key, value):
    with pytest.raises(HparamsError) as err:
        DECODEHyperParams.from_config({"alg_name": "DECODE", key: value})
    assert f"'{key}'" in str(err.value)


@pytest.mark.parametrize("alg", ["DeCo", "decode", "Decode", "FT"])
def test_alg_name_is_exact(alg):
    with pytest.raises(HparamsError, match="alg_name"):
        DECODEHyperParams.from_config({"alg_name": alg})


def test_bad_requests_name_the_field(family_setup):
    model, tok, _, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, max_steps=1)
    good = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    for field, req in (("target", {**good, "target": ""}), ("prompt", {**good, "prompt": None}),
                       ("image", {k: v for k, v in good.items() if k != "image"}),
                       ("image", {**good, "image": "picture.jpg"})):
        with pytest.raises(RequestError) as err:
            decode_main.apply_decode_to_multimodal_model(model, tok, [req], hp)
        assert f"'{field}'" in str(err.value)
    with pytest.raises(TypeError, match="DECODEHyperParams"):
        decode_main.apply_decode_to_multimodal_model(model, tok, [good], SimpleNamespace(alg_name="DECODE"))
    bad = dataclasses.replace(hp)
    bad.group_mode = "both"
    with pytest.raises(HparamsError, match="'group_mode'"):
        decode_main.apply_decode_to_multimodal_model(model, tok, [good], bad)


# -- the early-stop tokens -------------------------------------------------------------------------

def test_early_stop_on_answer_fires_where_the_end_of_answer_token_keeps_the_reference_rule_running():
    """The world model never learnt to end an answer: the EOS term keeps the reference's mean CE high, so
    its rule cannot fire, while the answer-only rule (``early_stop_on: answer``) stops the stage."""
    from mke_plugins.hparams import load_hparams

    model, tok, requests = world_requests(1)
    req = requests[0]
    adapter = get_adapter(model, load_hparams("DECODE", "world"))
    stage = localize.build_stage_input(adapter, model, tok, localize.stage_queries(req).text,
                                       load_hparams("DECODE", "world"))
    with torch.no_grad():
        logits = adapter.forward(model, stage.batch)
        with_eos, answer = float(adapter.loss(model, stage.batch, logits=logits)), offsets.answer_ce(logits, stage)
    assert answer < with_eos  # the EOS token is what the reference rule waits for
    threshold = (answer + with_eos) / 2  # met by the answer tokens alone, not with EOS
    runs = {}
    for on in ("answer_eos", "answer"):
        hp = load_hparams("DECODE", "world", max_steps=4, early_stop_text=threshold, early_stop_on=on)
        before = state_of(model)
        res = offsets.run_decode(model, tok, [req], hp, adapter=adapter)
        runs[on] = next(s for s in res.reports[0].stages if s.name == "text")
        res.snapshot.restore()
        assert_same_state(before, model)
    assert DECODEHyperParams.early_stop_on == "answer_eos"  # the reference rule stays the default
    assert not runs["answer_eos"].early_stopped and runs["answer_eos"].steps == 4
    assert runs["answer"].early_stopped and runs["answer"].steps == 0
    assert runs["answer"].final_l_answer == pytest.approx(answer, abs=1e-5)


# -- prefix replay ------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2-vl", "qwen3-vl", "llava-onevision", "blip2"])
def test_prefix_replay_makes_the_same_edit(family, family_setup):
    """Each stage re-runs only the layers from its group's lowest one up (core.replay): the folded
    weights and every per-edit stat are those of the full-model run, bit for bit."""
    from mke_plugins.core.replay import replay_watch

    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image(family),
           "text_only_prompt": "What is the capital of Italy?", "image_only_prompt": "What city is in the picture?"}
    runs = []
    for replay in (False, True):
        model, tok, _adapter, name = family_setup(family)
        hp = tiny_hparams(name, max_steps=4, prefix_replay=replay)
        with replay_watch() as watch:  # a prefix that changed under a cached batch raises here
            _edited, handle = decode_main.apply_decode_to_multimodal_model(model, tok, [req], hp,
                                                                           return_orig_weights=True)
        stats = {k: v for k, v in handle.stats.flat().items() if "seconds" not in k}
        runs.append(({k: v.clone() for k, v in model.state_dict().items()}, stats, watch))
    (full_state, full_stats, _), (state, stats, watch) = runs
    assert stats == full_stats and stats["steps"] > 0
    assert full_state.keys() == state.keys() and all(torch.equal(full_state[k], state[k]) for k in state)
    assert sum(s.replays for s in watch) > 0, watch


# -- noisy copies (fit_copies) --------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision", "blip2", "minigpt4"])
def test_noisy_copies_enter_every_stage_and_leave_nothing_behind(family, family_setup):
    """fit_copies: every stage trains on the clean input and its noisy copies (full model, no prefix
    replay), which changes the offsets; the stats read the clean row; restore is bit-exact, no hook is left."""
    from mke_plugins.core.replay import replay_watch

    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image(family),
           "text_only_prompt": "What is the capital of Italy?", "image_only_prompt": "What city is in the picture?"}
    runs = {}
    for copies in (0, 2):
        model, tok, adapter, name = family_setup(family)
        with torch.no_grad():  # transformers installs its own output-capturing hooks on a first forward
            adapter.loss(model, adapter.batch(model, tok, [Query(req["image"], req["prompt"], "Rome")]))
        before, hooks = state_of(model), hook_counts(model)
        hp = tiny_hparams(name, max_steps=3, fit_copies=copies, fit_noise=2.0)
        with replay_watch() as watch:
            _edited, handle = decode_main.apply_decode_to_multimodal_model(model, tok, [req], hp,
                                                                           return_orig_weights=True)
        runs[copies] = {k: v.clone() for k, v in model.state_dict().items()}
        stats = handle.stats.flat()
        assert stats["steps_text"] == 3 and stats["steps_image"] == 3, stats
        if copies:
            assert watch and all(s.start is None and s.replays == 0 for s in watch), watch
        handle()
        assert_same_state(before, model)
        assert hook_counts(model) == hooks
    assert any(not torch.equal(runs[0][k], runs[2][k]) for k in runs[0]), "the copies did not change the edit"


def test_noisy_copies_keep_the_kl_and_the_report_on_the_clean_row(family_setup, monkeypatch):
    """The KL and the reported CE are those of row 0 (the clean input), whatever the copies give."""
    model, tok, adapter, name = family_setup("qwen2-vl")
    seen = []
    real_kl = offsets.kl_loss

    def kl_spy(logits, stage):
        seen.append(logits.shape[0])
        return real_kl(logits, stage)

    monkeypatch.setattr(offsets, "kl_loss", kl_spy)
    req = {"prompt": "What is shown?", "target": "Rome", "image": native_image("qwen2-vl")}
    hp = tiny_hparams(name, max_steps=2, fit_copies=3, fit_noise=2.0, lr=1e-12)
    _edited, handle = decode_main.apply_decode_to_multimodal_model(model, tok, [req], hp, return_orig_weights=True)
    assert seen and set(seen) == {1}
    stage = localize.build_stage_input(adapter, model, tok, Query(None, "What is shown?", "Rome"), hp)
    with torch.no_grad():
        clean = float(adapter.loss(model, stage.batch))
    # lr ~ 0: the offsets stay ~ 0, so the reported text-stage CE is the clean model's
    assert handle.stats.flat()["l_tgt_text"] == pytest.approx(clean, rel=1e-4)
    handle()
