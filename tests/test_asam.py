"""ASAM: conformance, RCSL/LAR/memory/patch units, the edit loop on the world, every family, YAMLs, errors.

Fast by design: tiny models with few steps for structure checks; the bundled world model for the
checks where an edit must really succeed.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import pytest
import torch

from mke_hooks import HparamsError, MKEError, RequestError
from mke_plugins.adapters import Query, get_adapter, resolve_layers
from mke_plugins.core.hooks import capture, hook_counts
from mke_plugins.core.snapshot import assert_same_state, state_of
from mke_plugins.core.wrap import GatedModel
from mke_plugins.methods.asam import asam_main, lar, memory, patch, rcsl
from mke_plugins.methods.asam.asam_hparams import ASAMHyperParams
from mke_plugins.testing import parametrize_with_checks
from mke_plugins.testing.families import REAL_YAMLS
from mke_plugins.testing.images import make_image, make_lavis_image, native_image

HPARAMS_DIR = Path(asam_main.__file__).parent / "hparams"
EVAL_ONLY = ("rephrase_prompt", "image_rephrase", "locality_prompt", "locality_ground_truth",
             "multimodal_locality_image", "multimodal_locality_prompt", "multimodal_locality_ground_truth",
             "portability", "fine_locality", "text_only_prompt", "image_only_prompt", "pred", "loc_prompt")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def tiny_hparams(model_name: str, **kw: Any) -> ASAMHyperParams:
    base = dict(alg_name="ASAM", model_name=model_name, lambda_mem=0.0, max_steps=3, lr=5e-2, lar_variants=4,
                lar_masks=["joint", "joint", "image", "text"], lar_steps=2)
    base.update(kw)
    return ASAMHyperParams.from_config(base)


@pytest.fixture
def family_setup(family_model):
    """``family_setup(family)`` -> (model, tok, adapter, model_name), the model warmed up (hooks settled)."""

    def make(family: str):
        model, tok, name = family_model(family)
        adapter = get_adapter(model, SimpleNamespace(model_name=name))
        with torch.no_grad():
            adapter.forward(model, adapter.batch(model, tok, [Query(native_image(family), "What is it?", "red")]))
        return model, tok, adapter, name

    return make


@pytest.fixture(scope="module")
def world_model():
    from mke_plugins import world

    model, tok = world.load()
    reqs = world.records("edit")
    return model, tok, reqs


def world_hparams(**kw: Any) -> ASAMHyperParams:
    from mke_plugins.hparams import read_yaml

    path = HPARAMS_DIR / "world.yaml"
    return ASAMHyperParams.from_config({**read_yaml(path), **kw}, path=str(path))


# -- the conformance kit ------------------------------------------------------------------------

@parametrize_with_checks(["ASAM"])
def test_conformance(method, check):
    check(method)


# -- RCSL -------------------------------------------------------------------------------------

def test_tail_energy_bounds_and_forms():
    d = 16
    same = torch.randn(1, d).repeat(5, 1) * torch.arange(1, 6).view(-1, 1)  # one direction, any scale
    assert float(rcsl.rcsl_loss(same, rank=1)[0]) == pytest.approx(0.0, abs=1e-6)
    assert float(rcsl.rcsl_loss(same, rank=1, form="nuclear")[0]) == pytest.approx(0.0, abs=1e-5)
    ortho = torch.eye(d)[:5] * 3.0
    assert float(rcsl.rcsl_loss(ortho, rank=1)[0]) == pytest.approx(1 - 1 / 5, abs=1e-6)
    assert float(rcsl.rcsl_loss(ortho, rank=2)[0]) == pytest.approx(1 - 2 / 5, abs=1e-6)
    assert float(rcsl.rcsl_loss(ortho, form="nuclear")[0]) == pytest.approx(5 ** 0.5 - 1, abs=1e-5)
    with pytest.raises(ValueError, match="rcsl_form"):
        rcsl.rcsl_loss(ortho, form="frobenius")


def test_svd_failure_falls_back_to_the_gram_matrix_with_the_same_value(monkeypatch):
    states = torch.randn(9, 32)
    expected, fell = rcsl.rcsl_loss(states, rank=1)
    assert not fell

    def broken(*a, **k):
        raise torch.linalg.LinAlgError("svd did not converge")

    monkeypatch.setattr(torch.linalg, "svdvals", broken)
    value, fell = rcsl.rcsl_loss(states.clone().requires_grad_(True), rank=1)
    assert fell and float(value.detach()) == pytest.approx(float(expected), abs=1e-5)
    value.backward()  # the fallback keeps a gradient: the term is never dropped


def test_asymmetric_flow_never_moves_the_anchor():
    states = torch.randn(5, 8, requires_grad=True)
    rcsl.rcsl_loss(states, asym=True)[0].backward()
    assert torch.equal(states.grad[0], torch.zeros(8)) and states.grad[1:].abs().sum() > 0
    states.grad = None
    rcsl.rcsl_loss(states, asym=False)[0].backward()
    assert states.grad[0].abs().sum() > 0


# -- LAR --------------------------------------------------------------------------------------

def test_masks_cover_prompt_positions_only_and_image_falls_back_to_text():
    prompt = torch.tensor([False, True, True, True, True, False, False])  # pad, prompt x4, answer x2
    image = torch.tensor([False, False, True, True, False, False, False])
    m, no_image = lar.variant_masks(prompt, image, ["joint", "image", "text"])
    assert not no_image
    assert m[0].tolist() == prompt.tolist()
    assert m[1].tolist() == [False, False, True, True, False, False, False]
    assert m[2].tolist() == [False, True, False, False, True, False, False]
    m, no_image = lar.variant_masks(prompt, torch.zeros(7, dtype=torch.bool), ["image", "text"])
    assert no_image and torch.equal(m[0], m[1]) and m[0].tolist() == prompt.tolist()


def _anchor(K: int = 3, T: int = 6, d: int = 8) -> lar.LatentAnchor:
    masks = torch.zeros(K, T, dtype=torch.bool)
    masks[:, 1:4] = True
    return lar.LatentAnchor(torch.rand(T) + 0.5, masks, False, d)


def test_projection_and_random_start_stay_in_the_masked_ball():
    anc = _anchor()
    gen = torch.Generator().manual_seed(0)
    start = lar.random_start(anc, 8, 0.1, gen)
    norms = start.norm(dim=-1)
    assert (norms <= 0.1 * anc.z_norm + 1e-6).all()
    assert (norms[:, [0, 4, 5]] == 0).all() and (norms[:, 1:4] > 0).all()
    big = torch.randn(3, 6, 8) * 10
    proj = lar.project(big, anc, 0.1)
    pn = proj.norm(dim=-1)
    assert torch.allclose(pn[:, 1:4], (0.1 * anc.z_norm)[1:4].expand(3, 3), rtol=1e-5)
    assert (pn[:, [0, 4, 5]] == 0).all()


def test_pgd_finds_harder_points_than_random_and_stays_in_the_ball(family_setup):
    model, tok, adapter, name = family_setup("qwen2-vl")
    q = Query(native_image("qwen2-vl"), "What is in the picture?", "red")
    b1 = adapter.batch(model, tok, [q])
    bk = adapter.batch(model, tok, [q] * 4)
    anc = lar.anchor_info(model, adapter, b1, ["joint", "joint", "image", "text"])
    kw = dict(rho=0.2, steps=5, alpha=0.1, gate=patch.GATE)
    rnd = lar.pgd(model, adapter, bk, anc, gen=torch.Generator().manual_seed(0), mode="random", **kw)
    adv = lar.pgd(model, adapter, bk, anc, gen=torch.Generator().manual_seed(0), **kw)
    assert not adv.requires_grad
    assert (adv.norm(dim=-1) <= 0.2 * anc.z_norm + 1e-5).all()
    assert (adv.norm(dim=-1)[~anc.masks] == 0).all()

    def nll(delta):
        with torch.no_grad(), lar.perturbed(adapter.embed_output(model), delta):
            return adapter.loss(model, bk, reduction="row")

    assert (nll(adv) > nll(rnd)).all(), "PGD should raise the new answer's NLL beyond its random start"
    assert nll(torch.zeros_like(adv)).std() < 1e-5  # identical rows without a perturbation


# -- memory bank ------------------------------------------------------------------------------

@pytest.fixture
def memory_dir(tmp_path: Path) -> Path:
    recs = []
    for i in range(5):
        make_image(40 + i).save(tmp_path / f"m{i}.png")
        recs.append({"src": f"What color is {i}?", "alt": "blue", "pred": "red", "image": f"m{i}.png",
                     "text_only_prompt": "The capital of France is", "image_only_prompt": "What is in the picture?",
                     "rephrase": "NEVER READ", "image_rephrase": "missing.png", "loc": "Who painted this?",
                     "loc_ans": "Alice"})
    (tmp_path / "train.json").write_text(json.dumps(recs))
    return tmp_path


def test_memory_prompts_fields_and_size(memory_dir: Path, family_setup):
    model, tok, adapter, name = family_setup("qwen2-vl")
    hp = tiny_hparams(name, memory_data=str(memory_dir), lambda_mem=5.0)
    qs = memory.memory_queries(hp, adapter)
    # src x5 (distinct), text-only x1 and image-only x5 (distinct pictures); never the rephrase fields
    assert len(qs) == 11 and not any("NEVER" in q.prompt for q in qs)
    assert sum(q.image is None for q in qs) == 1
    hp.memory_fields = ["loc"]
    assert [q.prompt for q in memory.memory_queries(hp, adapter)] == ["Who painted this?"]
    hp.memory_fields, hp.memory_size = ["src"], 3
    assert len(memory.memory_queries(hp, adapter)) == 3


def test_memory_bank_is_cached_in_memory_and_on_disk(memory_dir: Path, tmp_path: Path, family_setup):
    model, tok, adapter, name = family_setup("qwen2-vl")
    memory.clear_cache()
    hp = tiny_hparams(name, memory_data=str(memory_dir), lambda_mem=5.0, memory_cache=str(tmp_path / "cache"),
                      memory_positions=2)
    bank, fp, src = memory.get_bank(model, tok, adapter, hp, [3])
    assert src == "built" and bank[3].shape == (11 * 2, 32) and bank[3].dtype == torch.float32
    again, fp2, src2 = memory.get_bank(model, tok, adapter, hp, [3])
    assert src2 == "memory" and fp2 == fp and again is bank
    memory.clear_cache()
    disk, fp3, src3 = memory.get_bank(model, tok, adapter, hp, [3])
    assert src3 == "disk" and fp3 == fp and torch.equal(disk[3], bank[3])
    assert list((tmp_path / "cache").glob("asam-bank-*.pt"))
    hp.memory_positions = "all"
    _, fp4, src4 = memory.get_bank(model, tok, adapter, hp, [3])
    assert fp4 != fp and src4 == "built"
    with torch.no_grad():
        model.lm_head.weight.add_(1.0)  # the weights are part of the fingerprint
    _, fp5, _ = memory.get_bank(model, tok, adapter, hp, [3])
    assert fp5 != fp4
    memory.clear_cache()



def test_weights_digest_is_computed_once_per_unchanged_model(memory_dir: Path, family_setup, monkeypatch):
    model, tok, adapter, name = family_setup("qwen2-vl")
    memory.clear_cache()
    calls: list[int] = []
    digest = memory.weights_digest
    monkeypatch.setattr(memory, "weights_digest", lambda m: calls.append(1) or digest(m))
    hp = tiny_hparams(name, memory_data=str(memory_dir), lambda_mem=5.0, memory_positions=2)
    _, fp, src = memory.get_bank(model, tok, adapter, hp, [3])
    assert src == "built" and len(calls) == 1
    _, fp2, src2 = memory.get_bank(model, tok, adapter, hp, [3])  # a second edit: nothing changed
    assert (fp2, src2) == (fp, "memory") and len(calls) == 1
    w = model.lm_head.weight
    orig = w.detach().clone()
    with torch.no_grad():
        w.add_(1.0)  # an in-place edit by another method: the version counter moves
    fp3 = memory.fingerprint(model, adapter, hp, [3], memory.records_file(hp.memory_data).read_bytes())
    assert fp3 != fp and len(calls) == 2
    with torch.no_grad():
        w.copy_(orig)  # restored: recomputed (the version moved again), and the values are back
    _, fp4, src4 = memory.get_bank(model, tok, adapter, hp, [3])
    assert (fp4, src4) == (fp, "memory") and len(calls) == 3
    memory.get_bank(model, tok, adapter, hp, [3])
    assert len(calls) == 3
    old_head = model.lm_head
    model.lm_head = torch.nn.Linear(old_head.in_features, old_head.out_features, bias=old_head.bias is not None)
    try:
        with torch.no_grad():
            model.lm_head.weight.copy_(old_head.weight)  # a swapped module with the same values
            if old_head.bias is not None:
                model.lm_head.bias.copy_(old_head.bias)
        _, fp5, _ = memory.get_bank(model, tok, adapter, hp, [3])
        assert fp5 == fp and len(calls) == 4
    finally:
        model.lm_head = old_head
    old_data = model.lm_head.weight.data
    model.lm_head.weight.data = old_data.clone()  # `.data =` keeps the version counter; data_ptr moves
    try:
        memory.get_bank(model, tok, adapter, hp, [3])
        assert len(calls) == 5
        memory.get_bank(model, tok, adapter, hp, [3])
        assert len(calls) == 5
    finally:
        model.lm_head.weight.data = old_data
    memory.clear_cache()

def test_memory_positions_keep_the_last_prompt_position():
    pm = torch.tensor([[False, True, True, True, True, False], [True, True, True, False, False, False]])
    m = memory.position_mask(pm, 2, torch.Generator().manual_seed(0))
    assert m.sum(1).tolist() == [2, 2] and bool(m[0, 4]) and bool(m[1, 2]) and not (m & ~pm).any()
    assert torch.equal(memory.position_mask(pm, "all", torch.Generator()), pm)


# -- the base patch -------------------------------------------------------------------------------

def test_anchor_keys_fire_at_one_and_the_memory_loss_gradient_is_exact():
    from mke_plugins.core.neurons import NeuronBlock

    block = NeuronBlock(16, 3, gated=True, act_fn=torch.nn.functional.silu)
    q = torch.randn(2, 16)
    patch.init_keys_anchor(block, q, torch.Generator().manual_seed(0))
    a = block.pre(q).detach()  # neurons 0 and 2 start from q_0, neuron 1 from q_1 (cycled), with 1e-3 noise
    assert a[0, 0] == pytest.approx(1.0, abs=1e-2) and a[0, 2] == pytest.approx(1.0, abs=1e-2)
    assert a[1, 1] == pytest.approx(1.0, abs=1e-2) and not torch.equal(block.key[0], block.key[2])
    assert torch.equal(block.key, block.key_up) and torch.equal(block.value, torch.zeros_like(block.value))
    mem = torch.randn(50, 16)
    loss = patch.memory_loss(block, mem, -1.0, 7, chunk=13)
    loss.backward()
    g_fast = block.key.grad.clone()
    block.key.grad = None
    ref = torch.relu(block.pre(mem) - (-1.0)).topk(7, dim=0).values.mean(0).mean()
    ref.backward()
    assert float(loss) == pytest.approx(float(ref), abs=1e-6)
    assert torch.allclose(g_fast, block.key.grad, atol=1e-6)


# -- edits on the world model -----------------------------------------------------------------------

class ProbeTrap(Mapping):
    """A request whose evaluation-only fields raise when read (the method never reads them)."""

    def __init__(self, req: dict[str, Any]) -> None:
        self._req = req

    def __getitem__(self, key: str) -> Any:
        if key in EVAL_ONLY:
            raise AssertionError(f"ASAM read the evaluation-only field {key!r} at edit time")
        return self._req[key]

    def __iter__(self) -> Iterator[str]:
        return iter(self._req)

    def __len__(self) -> int:
        return len(self._req)


def test_world_edit_succeeds_on_its_unit_and_restores(world_model):
    model, tok, reqs = world_model
    adapter = get_adapter(model, world_hparams())
    req = reqs[0]
    with torch.no_grad():
        adapter.forward(model, adapter.batch(model, tok, [Query(req["image"], req["prompt"], req["target"])]))
    before, hooks = state_of(model), hook_counts(model)
    edited, wc = asam_main.apply_asam_to_multimodal_model(model, tok, [ProbeTrap(req)], world_hparams(),
                                                          return_orig_weights=True)
    st = wc.stats.flat()
    assert isinstance(edited, GatedModel) and st["stopped"] and st["rows_correct"] == 1.0
    assert st["variants"] == 8 and 0.0 <= st["coherence_first"] <= 1.0 and st["image_as_text"] is False
    assert st["rcsl"] is not None and st["memory_states"] > 1000
    batch = adapter.batch(model, tok, [Query(req["image"], req["prompt"], req["target"])])
    with torch.no_grad():
        assert bool(adapter.success(adapter.forward(edited, batch), batch)[0])
        assert not bool(adapter.success(adapter.forward(model, batch), batch)[0]), "the bare model must stay original"
    wc()
    assert_same_state(before, model)
    assert hook_counts(model) == hooks
    assert patch.existing_state(model) is None


def test_scope_threshold_confines_a_finished_edit_to_its_anchor(world_model):
    """Lifelong mode (core.scope): the trained block gets the anchor's FFN inputs as its scope; the edit
    still holds on its own prompt, and a prompt outside the scope gets the bare model's logits exactly."""
    model, tok, reqs = world_model
    adapter = get_adapter(model, world_hparams())
    req, other = reqs[4], reqs[5]
    before = state_of(model)
    edited, wc = asam_main.apply_asam_to_multimodal_model(model, tok, [req], world_hparams(scope_threshold=0.8),
                                                          return_orig_weights=True)
    (block,) = patch.existing_state(model).patches.blocks()
    assert block.scope is not None and block.scope.threshold == 0.8
    assert wc.stats.edits[0].added_bytes >= block.scope.nbytes > 0
    own = adapter.batch(model, tok, [Query(req["image"], req["prompt"], req["target"])])
    away = adapter.batch(model, tok, [Query(None, other["locality_prompt"], other["locality_ground_truth"])])
    infos = adapter.layers(model)
    with torch.no_grad():
        assert bool(adapter.success(adapter.forward(edited, own), own)[0])
        with capture({0: infos[block.layer].ffn_in}) as rec:
            bare = adapter.forward(model, away)
        assert not bool(block.scope.admits(rec[0]).any()), "the probe must lie outside the scope"
        assert torch.equal(adapter.forward(edited, away), bare)
        scope, block.scope = block.scope, None  # without it the block would act on the probe
        assert not torch.equal(adapter.forward(edited, away), bare)
        block.scope = scope
    wc()
    assert_same_state(before, model)
    assert patch.existing_state(model) is None


def test_base_editor_is_the_lar_rcsl_off_ablation(world_model):
    model, tok, reqs = world_model
    hp = world_hparams(lar=False, rcsl=False)
    edited, wc = asam_main.apply_asam_to_multimodal_model(model, tok, reqs[1], hp, return_orig_weights=True)
    st = wc.stats.flat()
    assert st["variants"] == 0 and st["coherence_first"] is None and st["rcsl"] is None and st["adv"] is None
    assert st["stopped"] and st["mem"] is not None
    wc()


def test_sequential_edits_accumulate_and_feed_the_memory(world_model):
    model, tok, reqs = world_model
    adapter = get_adapter(model, world_hparams())
    hp = world_hparams(lar_variants=2, lar_masks=["joint", "image"], lar_steps=2)
    before = state_of(model)
    e1, wc1 = asam_main.apply_asam_to_multimodal_model(model, tok, [reqs[2]], hp, return_orig_weights=True)
    e2, wc2 = asam_main.apply_asam_to_multimodal_model(e1, tok, reqs[3], hp, return_orig_weights=True)
    assert isinstance(e2, GatedModel) and not isinstance(e2.model, GatedModel) and e2.gates == (patch.GATE,)
    st = patch.existing_state(model)
    assert len(st.patches.blocks()) == 2 and len(st.extra_rows) == 2
    assert wc2.stats.flat()["memory_states"] > wc1.stats.flat()["memory_states"]  # edit 1's anchor states joined M
    for r in (reqs[2], reqs[3]):
        b = adapter.batch(model, tok, [Query(r["image"], r["prompt"], r["target"])])
        with torch.no_grad():
            assert bool(adapter.success(adapter.forward(e2, b), b)[0])
    wc1()  # restore out of order: only edit 1's block and rows go
    assert len(st.patches.blocks()) == 1 and len(st.extra_rows) == 1
    wc2()
    assert_same_state(before, model)
    assert patch.existing_state(model) is None


def test_lifelong_mode_keeps_no_bank_rows_and_runs_finished_edits_as_one_stack(world_model):
    """scope_threshold with lambda_mem 0 (README, "Sequential editing"): no memory-bank rows are kept,
    the finished edits' blocks run as one stack, every edit still holds, and restore is exact."""
    model, tok, reqs = world_model
    adapter = get_adapter(model, world_hparams())
    hp = world_hparams(lar_variants=2, lar_masks=["joint", "image"], lar_steps=2, scope_threshold=0.8, lambda_mem=0,
                       scope_exclusive=True)
    before = state_of(model)
    edited, wc = asam_main.apply_asam_to_multimodal_model(model, tok, reqs[:3], hp, return_orig_weights=True)
    st = patch.existing_state(model)
    blocks = st.patches.blocks()
    assert len(blocks) == 3 and st.extra_rows == [] and all(b.frozen and b.scope.exclusive for b in blocks)
    for b, e in zip(blocks, wc.stats.edits, strict=True):  # an edit holds its block and its scope, nothing else
        assert e.added_bytes == sum(p.numel() * 4 for p in b.parameters()) + b.scope.nbytes
    for r in reqs[:3]:
        b = adapter.batch(model, tok, [Query(r["image"], r["prompt"], r["target"])])
        with torch.no_grad():
            assert bool(adapter.success(adapter.forward(edited, b), b)[0])
    slot = next(iter(st.patches._slots.values()))
    assert slot.stack is not None and slot.stack.blocks == blocks and slot.stack.exclusive
    wc()
    assert_same_state(before, model)
    assert patch.existing_state(model) is None


# -- every family -------------------------------------------------------------------------------

@pytest.mark.parametrize("family", ["qwen2-vl", "qwen2.5-vl", "qwen3-vl", "llava-onevision", "blip2", "minigpt4"])
def test_one_edit_on_every_family(family, family_setup):
    model, tok, adapter, name = family_setup(family)
    hp = tiny_hparams(name, max_steps=4)
    req = {"prompt": "What is in the picture?", "target": "red", "image": native_image(family)}
    batch = adapter.batch(model, tok, [Query(req["image"], req["prompt"], req["target"])])
    before, hooks = state_of(model), hook_counts(model)
    with torch.no_grad():
        loss0 = adapter.loss(model, batch)
    edited, wc = asam_main.apply_asam_to_multimodal_model(model, tok, req, hp, return_orig_weights=True)
    with torch.no_grad():
        assert adapter.loss(edited, batch) < loss0
        assert adapter.loss(model, batch) == loss0
    text, wc_text = asam_main.apply_asam_to_multimodal_model(model, tok, [dict(req, image=None)], hp,
                                                             return_orig_weights=True)
    assert wc_text.stats.flat()["image_as_text"] is True
    wc_text()
    wc()
    assert_same_state(before, model)
    assert hook_counts(model) == hooks


@pytest.mark.parametrize("family", ["qwen2-vl", "llava-onevision", "qwen3-vl", "blip2"])
def test_prefix_replay_makes_the_same_edit(family, family_setup):
    """The PGD and main passes re-run only the decoder layers (core.replay): the edited model's logits
    and every per-edit stat are those of the full-model run, bit for bit, and the replay was used
    wherever the family's layer chain is plain."""
    from mke_plugins.core.replay import replay_watch

    model, tok, adapter, name = family_setup(family)
    req = {"prompt": "What is in the picture?", "target": "red", "image": native_image(family)}
    batch = adapter.batch(model, tok, [Query(req["image"], req["prompt"], req["target"])])
    runs = []
    for replay in (False, True):
        with replay_watch() as watch:  # a prefix that changed under a cached batch raises here
            edited, wc = asam_main.apply_asam_to_multimodal_model(
                model, tok, req, tiny_hparams(name, max_steps=3, prefix_replay=replay), return_orig_weights=True)
        with torch.no_grad():
            logits = adapter.forward(edited, batch)
        stats = {k: v for k, v in wc.stats.flat().items() if "seconds" not in k}
        wc()
        runs.append((logits, stats, watch))
    (full_logits, full_stats, _), (logits, stats, watch) = runs
    assert stats == full_stats and stats["steps"] > 0
    assert torch.equal(logits, full_logits)
    if family != "qwen3-vl":  # Qwen3-VL's deepstack adds vision features after layer 0: always the full model
        assert sum(s.replays for s in watch) >= stats["steps"] * 3, watch


@pytest.mark.slow
def test_key_init_unit_and_ablation_switches_run(family_setup):
    model, tok, adapter, name = family_setup("qwen2-vl")
    req = {"prompt": "What is in the picture?", "target": "red", "image": native_image("qwen2-vl")}
    for kw in (dict(key_init="unit"), dict(lar_mode="random"), dict(lar_objective="targeted"), dict(asym=False),
               dict(rcsl_form="nuclear"), dict(stop_on="anchor"), dict(lar_regen_every=2), dict(rcsl=False)):
        _, wc = asam_main.apply_asam_to_multimodal_model(model, tok, req, tiny_hparams(name, **kw),
                                                       return_orig_weights=True)
        assert wc.stats.flat()["steps"] >= 1, kw
        wc()


# -- YAMLs ---------------------------------------------------------------------------------------



def test_bundled_yamls_are_the_expected_set():
    assert sorted(p.stem for p in HPARAMS_DIR.glob("*.yaml")) == sorted([*REAL_YAMLS, "world", "lifelong"])
    hp = ASAMHyperParams.from_hparams(HPARAMS_DIR / "world.yaml")
    assert (hp.edit_layers, hp.n_neurons, hp.lar_variants, hp.lar_steps, hp.lar_eps) == ([-1], 2, 8, 5, 0.2)
    assert hp.memory_data and Path(hp.memory_data, "train.json").is_file()


@pytest.mark.parametrize("yaml_name", sorted(REAL_YAMLS))
def test_real_family_yaml_matches_same_family_tiny_model(yaml_name, family_setup):
    family, n_real = REAL_YAMLS[yaml_name][:2]
    pattern = REAL_YAMLS[yaml_name].layers
    path = HPARAMS_DIR / f"{yaml_name}.yaml"
    hp = ASAMHyperParams.from_hparams(path)
    assert pattern in path.read_text(), f"{path}: its header comment should name the decoder layers {pattern}"
    model, tok, tiny_adapter, _ = family_setup(family)
    assert get_adapter(None, hp).family == tiny_adapter.family
    assert resolve_layers(hp.edit_layers, n_real) == [n_real - 2, n_real - 1]  # the last two (README)
    assert (hp.n_neurons, hp.lar_variants, hp.lar_masks, hp.lar_eps, hp.lar_steps) == \
        (5, 4, ["joint", "joint", "image", "text"], 0.05, 3)
    names = {id(m): n for n, m in model.named_modules()}
    for info in tiny_adapter.layers(model):
        assert names[id(info.layer)] == pattern.format(i=info.index)
        assert info.ffn_in.where == "input" and info.ffn_out.where == "output"


# -- errors name the field ----------------------------------------------------------------------

@pytest.mark.parametrize("overrides,key", [
    (dict(lar=False), "rcsl"),
    (dict(lar_variants=0, lar_masks=[]), "lar_variants"),
    (dict(lar_eps=0.0), "lar_eps"),
    (dict(lar_masks=["joint"]), "lar_masks"),
    (dict(lar_masks=["joint"] * 7 + ["audio"]), "lar_masks"),
    (dict(memory_data=None), "memory_data"),
    (dict(rcsl_rank=9), "rcsl_rank"),
    (dict(key_init="random"), "key_init"),
    (dict(memory_positions=0), "memory_positions"),
    (dict(memory_fields=["rephrase"]), "memory_fields"),
    (dict(edit_layers=[]), "edit_layers"),
])
def test_bad_hparams_name_the_field(overrides, key):
    with pytest.raises(HparamsError) as err:
        world_hparams(**overrides)
    assert key in str(err.value)


def test_lar_off_message_and_base_editor_is_valid():
    with pytest.raises(HparamsError, match="RCSL needs variants"):
        world_hparams(lar=False)
    assert world_hparams(lar=False, rcsl=False).n_variants == 0
    assert world_hparams(lambda_mem=0.0, memory_data=None).lambda_mem == 0.0


def test_runtime_errors_name_the_field(family_setup, tmp_path):
    model, tok, adapter, name = family_setup("qwen2-vl")
    req = {"prompt": "What is in the picture?", "target": "red", "image": native_image("qwen2-vl")}
    with pytest.raises(HparamsError, match="edit_layers"):
        asam_main.apply_asam_to_multimodal_model(model, tok, req, tiny_hparams(name, edit_layers=[7]))
    with pytest.raises(HparamsError, match="memory_data"):
        asam_main.apply_asam_to_multimodal_model(model, tok, req, tiny_hparams(name, lambda_mem=1.0,
                                                                               memory_data=str(tmp_path / "none")))
    with pytest.raises(RequestError, match="image"):
        asam_main.apply_asam_to_multimodal_model(model, tok, dict(req, image=make_lavis_image(0)), tiny_hparams(name))
    with pytest.raises(RequestError, match="file_type"):
        asam_main.apply_asam_to_multimodal_model(model, tok, dict(req, file_type="video"), tiny_hparams(name))
    with pytest.raises(TypeError, match="ASAMHyperParams"):
        asam_main.apply_asam_to_multimodal_model(model, tok, req, SimpleNamespace(model_name=name))
    assert patch.existing_state(model) is None


def test_non_finite_loss_names_the_step_and_term(family_setup, monkeypatch):
    model, tok, adapter, name = family_setup("qwen2-vl")
    before = state_of(model)
    from mke_plugins.methods.asam import loop

    monkeypatch.setattr(loop, "rcsl_loss", lambda *a, **k: (torch.tensor(float("nan")), False))
    req = {"prompt": "What is in the picture?", "target": "red", "image": native_image("qwen2-vl")}
    with pytest.raises(MKEError, match=r"'rcsl' is not finite at outer step 1"):
        asam_main.apply_asam_to_multimodal_model(model, tok, req, tiny_hparams(name))
    assert patch.existing_state(model) is None  # a failed edit leaves nothing behind
    assert_same_state(before, model)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_edit_and_restore(world_model):
    model, tok, reqs = world_model
    import copy

    m = copy.deepcopy(model).cuda()
    before = state_of(m)
    edited, wc = asam_main.apply_asam_to_multimodal_model(m, tok, reqs[0], world_hparams(), return_orig_weights=True)
    assert wc.stats.flat()["stopped"]
    wc()
    assert_same_state(before, m)


# -- variant regeneration and the stop rule -------------------------------------------------------------

@pytest.mark.parametrize("every,fresh_stop", [(1, True), (1000, True), (1000, False)])
def test_regen_every_reuses_variants_and_stops_only_on_fresh_ones(world_model, monkeypatch, every, fresh_stop):
    """Every outer step regenerates by default; with ``lar_regen_every`` N > 1 a set is reused, and the stop
    rule, when it holds on a reused set, is checked again on a fresh one (``lar_fresh_stop``) before it stops."""
    model, tok, reqs = world_model
    made_at: list[int] = []
    real_pgd = lar.pgd

    def counting_pgd(*args: Any, **kw: Any) -> torch.Tensor:
        made_at.append(len(made_at))
        return real_pgd(*args, **kw)

    monkeypatch.setattr(lar, "pgd", counting_pgd)
    hp = world_hparams(lambda_mem=0.0, lar_regen_every=every, lar_fresh_stop=fresh_stop)
    before = state_of(model)
    edited, wc = asam_main.apply_asam_to_multimodal_model(model, tok, reqs[2], hp, return_orig_weights=True)
    st = wc.stats.flat()
    wc()
    assert_same_state(before, model)
    assert st["stopped"] and st["steps"] < hp.max_steps and st["regenerations"] == len(made_at)
    if every == 1:  # the paper's loop: one fresh set per outer step, the stopping forward's included
        assert len(made_at) == st["steps"] + 1
    elif fresh_stop:  # the first set, then one more to confirm a stop seen on the reused set
        assert st["steps"] > 0 and 2 <= len(made_at) <= st["steps"]  # a stop after updates is on a reused set
    else:  # one set for the whole edit: the stop is accepted on it
        assert len(made_at) == 1
