"""UniKE (see its README): hparams, offline archive, edit, restore, sequential edits, ablations, trainer glue.

Every archive here is built by the real offline code on tiny models in seconds; nothing is
mocked. The world-model checks (conformance, acceptance numbers) live in the conformance kit and
``mke-plugins bench``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from mke_hooks import HparamsError
from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import Query
from mke_plugins.core.hooks import hook_counts
from mke_plugins.core.snapshot import assert_same_state, state_of
from mke_plugins.methods.unike.archive import UniKEArchiveError, read_payload, record_hash
from mke_plugins.methods.unike.unike_hparams import UniKEHyperParams, UniKETrainingHparams
from mke_plugins.testing.images import native_image

HERE = Path(__file__).resolve().parent.parent / "mke_plugins" / "methods" / "unike" / "hparams"
FAMILY_YAML = {"qwen2-vl": "qwen2vl-7b", "qwen2.5-vl": "qwen2.5vl-7b", "qwen3-vl": "qwen3vl-4b",
               "llava-onevision": "llavaov-7b", "blip2": "blip2", "minigpt4": "minigpt4"}
WORDS = ["red", "blue", "green", "cat", "dog", "tree", "house", "river", "apple", "lemon", "star", "moon"]


def _records(family: str, n: int, offset: int = 0) -> list[dict[str, Any]]:
    out = []
    for i in range(offset, offset + n):
        out.append({"prompt": f"What is the {WORDS[i % 12]} thing number {i}?", "target": WORDS[(i * 5 + 3) % 12],
                    "image": native_image(family, i), "rephrase_prompt": f"Name the {WORDS[i % 12]} one, {i}?",
                    "image_rephrase": native_image(family, 100 + i)})
    return out


def _train_hparams(model_name: str, **over: Any) -> UniKETrainingHparams:
    cfg = dict(alg_name="UniKE", model_name=model_name, layers=[-2, -1], bank_size=64, enc_batch_size=16,
               enc_epochs=3, holdout=0.2, tru_dim=None, enc_lr=1e-3, zeta_fit_size=None, seed=7)
    cfg.update(over)
    return UniKETrainingHparams.from_config(cfg)


def _edit_hparams(model_name: str, archive: str | None = None, **over: Any) -> UniKEHyperParams:
    cfg = dict(alg_name="UniKE", model_name=model_name, archive=archive, layers=[-2, -1], num_neurons=2,
               top_k=4, edit_lr=5e-2, max_edit_steps=6, stop_loss=0.0)
    cfg.update(over)
    return UniKEHyperParams.from_config(cfg)


def _build(model: Any, tok: Any, family: str, path: Path, **over: Any) -> dict[str, Any]:
    from mke_plugins.methods.unike.unike_train import build_archive

    hp = _train_hparams(family, **over)
    return build_archive(hp, model, tok, _records(family, 12), "test", str(path), progress=False)


@pytest.fixture(scope="module")
def qwen(tiny_dir, tmp_path_factory) -> dict[str, Any]:
    """A tiny qwen2-vl model, its processor and an archive built on it by the offline stage."""
    from mke_plugins.testing.tiny import load_tiny

    model, tok = load_tiny(tiny_dir("qwen2-vl"))
    path = tmp_path_factory.mktemp("unike") / "tiny.pt"
    summary = _build(model, tok, "qwen2-vl", path)
    return {"model": model, "tok": tok, "archive": str(path), "summary": summary, "dir": tiny_dir("qwen2-vl")}


def _apply(setup: dict[str, Any], requests: Any, **over: Any) -> tuple[Any, Any]:
    from mke_plugins.methods.unike.unike_main import apply_unike_to_multimodal_model

    over.setdefault("archive", setup["archive"])
    hp = _edit_hparams("qwen2-vl", **over)
    return apply_unike_to_multimodal_model(setup["model"], setup["tok"], requests, hp, return_orig_weights=True)


def _nll(setup: dict[str, Any], model: Any, rec: dict[str, Any]) -> float:
    ad = get_adapter(setup["model"])
    b = ad.batch(setup["model"], setup["tok"], [Query(rec["image"], rec["prompt"], rec["target"])])
    with torch.no_grad():
        return float(ad.loss(model, b))


# -- hparams -----------------------------------------------------------------------------------
def test_every_yaml_loads_and_layers_fit_the_family_structure(family_model) -> None:
    from mke_plugins.adapters import resolve_layers

    for family, key in FAMILY_YAML.items():
        hp = UniKEHyperParams.from_hparams(HERE / f"{key}.yaml")
        tr = UniKETrainingHparams.from_hparams(HERE / "training" / f"{key}.yaml")
        assert hp.alg_name == "UniKE" and tr.alg == "UniKE" and tr.lr == tr.enc_lr
        assert set(hp.layers) <= set(tr.layers), f"{key}: editing layers must be banked by the training YAML"
        model = family_model(family)[0]
        n = len(get_adapter(model).layers(model))
        assert resolve_layers(hp.layers, n) == list(range(n - 4, n))
    world = UniKEHyperParams.from_hparams(HERE / "world.yaml")
    assert world.archive.endswith("archives/world.pt") and world.layers == [-2, -1] and world.top_k == 4
    lifelong = UniKEHyperParams.from_hparams(HERE / "lifelong.yaml")  # the lifelong world's copy, its own archive
    assert lifelong.archive.endswith("archives/lifelong.pt") and Path(lifelong.archive).is_file()
    assert "lifelong" in lifelong.model_name and (lifelong.layers, lifelong.top_k) == (world.layers, world.top_k)
    meta = read_payload(lifelong.archive)["meta"]
    assert meta["format"] == "mke-unike/1" and meta["layers"] == [2, 3] and meta["n_triplets"] > 0


def test_names_and_validation() -> None:
    assert UniKEHyperParams.from_config({"alg_name": "UNIKE"}).alg_name == "UniKE"
    for bad in ("UnKE", "UNKE"):
        with pytest.raises(HparamsError, match="UnKE"):
            UniKEHyperParams.from_config({"alg_name": bad})
    with pytest.raises(HparamsError, match="alpha_mode"):
        UniKEHyperParams.from_config({"alpha_mode": "adaptive"})
    with pytest.raises(HparamsError, match="use_intrinsic"):
        UniKEHyperParams.from_config({"use_intrinsic": False, "use_external": False})
    with pytest.raises(HparamsError, match="cloc"):
        UniKETrainingHparams.from_config({"cloc": 1})
    from mke_hooks import close_matches
    assert "UnKE" not in close_matches("UniKE", ["UnKE", "MEND"])
    assert "UniKE" not in close_matches("UnKE", ["UniKE", "MEND"])


# -- offline stage -----------------------------------------------------------------------------
def test_archive_is_plain_and_complete(qwen) -> None:
    obj = torch.load(qwen["archive"], weights_only=True)
    payload = read_payload(qwen["archive"])
    meta = payload["meta"]
    assert set(obj) == {"model"} and meta["format"] == "mke-unike/1" and meta["layers"] == [2, 3]
    n = meta["n_triplets"]
    assert n == qwen["summary"]["triplets"] > 0 and payload["bank.h_pos"].shape == (n, 2, 32)
    assert payload["bank.h_sem"].dtype == torch.float16 and payload["mu"].dtype == torch.float32
    assert payload["w_zeta"].shape == (2, 32, 32) and payload["zeta"].shape == (2, 32)
    assert any(k.startswith("enc_sem.2.") for k in payload) and any(k.startswith("enc_tru.3.") for k in payload)
    assert record_hash("What is the red thing number 0?", "cat") in meta["record_hashes"]
    assert torch.isfinite(payload["w_zeta"]).all() and payload["zeta"].norm() > 0


def test_offline_is_deterministic(qwen, tmp_path) -> None:
    _build(qwen["model"], qwen["tok"], "qwen2-vl", tmp_path / "again.pt")
    a, b = read_payload(qwen["archive"]), read_payload(tmp_path / "again.pt")
    for k, v in a.items():
        assert (torch.equal(v, b[k]) if torch.is_tensor(v) else v == b[k]), k


def test_loss_trains_only_encoders(qwen) -> None:
    from mke_plugins.methods.unike.offline import UniKEOffline

    model, tok = qwen["model"], qwen["tok"]
    off = UniKEOffline(model, tok, _train_hparams("qwen2-vl", enc_batch_size=8))
    ad = get_adapter(model)
    recs = _records("qwen2-vl", 4)
    b = ad.batch(model, tok, [Query(r["image"], r["prompt"], r["target"]) for r in recs])
    states = off.observe(b, add_to_bank=True)
    assert len(states) + states.skipped == 4 and off.bank_size == len(states) and off.mu_count > 0
    loss, parts = off.loss(states)
    loss.backward()
    assert all(p.grad is not None for p in off.encoder_parameters())
    assert all(p.grad is None for p in model.parameters())
    again = off.observe(b, add_to_bank=True)  # same rows: never banked twice
    assert off.bank_size == len(states) and len(again) == len(states)
    assert {"unike/l_tru", "unike/l_sem"} <= set(parts)


def test_leak_guard(qwen) -> None:
    from mke_plugins.methods.unike.archive import check_no_leak

    seen = _records("qwen2-vl", 2)
    with pytest.raises(UniKEArchiveError, match="used to build the archive"):
        check_no_leak(qwen["archive"], seen, split="edit")
    with pytest.raises(UniKEArchiveError, match="evaluated split"):
        check_no_leak(qwen["archive"], [], split="train")
    check_no_leak(qwen["archive"], _records("qwen2-vl", 2, offset=200), split="edit")


# -- archive errors ----------------------------------------------------------------------------
def test_archive_errors_are_specific(qwen, tmp_path) -> None:
    rec = _records("qwen2-vl", 1, offset=40)[0]
    with pytest.raises(UniKEArchiveError, match="mke-plugins train UniKE"):
        _apply(qwen, rec, archive=None)
    with pytest.raises(UniKEArchiveError, match="does not exist"):
        _apply(qwen, rec, archive=str(tmp_path / "nope.pt"))
    bad = tmp_path / "bad.pt"
    torch.save({"model": {"meta": {"format": "other"}}}, bad)
    with pytest.raises(UniKEArchiveError, match="format"):
        _apply(qwen, rec, archive=str(bad))
    with pytest.raises(UniKEArchiveError, match="covers only"):
        _apply(qwen, rec, layers=[0, 3])
    import copy

    other = copy.deepcopy(qwen["model"])
    with torch.no_grad():
        get_adapter(other).layers(other)[3].keys[0].weight.add_(0.5)
    from mke_plugins.methods.unike.unike_main import apply_unike_to_multimodal_model
    with pytest.raises(UniKEArchiveError, match="fingerprint"):
        apply_unike_to_multimodal_model(other, qwen["tok"], rec, _edit_hparams("qwen2-vl", qwen["archive"]))


# -- edit, restore, sequential, ablations ------------------------------------------------------
def test_edit_learns_restores_bit_exactly_and_keeps_bare_model(qwen) -> None:
    model = qwen["model"]
    rec = _records("qwen2-vl", 1, offset=30)[0]
    before, hooks = state_of(model), hook_counts(model)
    pre = _nll(qwen, model, rec)
    edited, handle = _apply(qwen, rec)
    assert edited.model is model and handle.stats.flat()["steps"] > 0
    assert _nll(qwen, edited, rec) < pre - 0.1
    assert _nll(qwen, model, rec) == pytest.approx(pre, abs=0)  # the bare model is untouched
    assert_same_state(before, model)
    list(handle.items())
    assert_same_state(before, model)
    assert hook_counts(model) == hooks
    handle()  # idempotent
    from mke_plugins.core.neurons import _REGISTRY
    from mke_plugins.methods.unike.runtime import _RUNTIMES
    assert model not in _RUNTIMES and model not in _REGISTRY


def test_prefix_replay_makes_the_same_edit(qwen) -> None:
    """The training loop re-runs only the layers from the lowest edited one up (core.replay): the edited
    model's logits and every per-edit stat are those of the full-model run, bit for bit."""
    from mke_plugins.core.replay import replay_watch

    model = qwen["model"]
    recs = _records("qwen2-vl", 2, offset=40)
    ad = get_adapter(model)
    batch = ad.batch(model, qwen["tok"], [Query(r["image"], r["prompt"], r["target"]) for r in recs])
    before = state_of(model)
    runs = []
    for replay in (False, True):
        with replay_watch() as watch:
            edited, handle = _apply(qwen, recs, prefix_replay=replay)
        with torch.no_grad():
            logits = ad.forward(edited, batch)
        stats = [{k: v for k, v in e.to_dict().items() if k != "seconds"} for e in handle.stats.edits]
        handle()
        assert_same_state(before, model)
        runs.append((logits, stats, watch))
    (full_logits, full_stats, _), (logits, stats, watch) = runs
    assert stats == full_stats and all(s["steps"] > 0 for s in stats)
    assert torch.equal(logits, full_logits)
    assert sum(s.replays for s in watch) == sum(s["steps"] for s in stats), watch


def test_sequential_edits_accumulate_and_undo_in_any_order(qwen) -> None:
    from mke_plugins.methods.unike import restore_all, set_active
    from mke_plugins.methods.unike.runtime import runtime_for

    model = qwen["model"]
    recs = _records("qwen2-vl", 3, offset=50)
    before, hooks = state_of(model), hook_counts(model)
    e1, h1 = _apply(qwen, recs[0])
    e2, h2 = _apply(qwen, recs[1:])  # a list of two: one call, two edits
    rt = runtime_for(model, create=False)
    assert rt.n_edits == 3 and len(rt.patches) == 6
    mem = rt.memories[3]
    assert len(mem) <= 3 * 4  # bank entries shared by edits are stored once
    assert _nll(qwen, e2, recs[0]) < _nll(qwen, model, recs[0])
    set_active(model, True)
    assert _nll(qwen, model, recs[0]) == pytest.approx(_nll(qwen, e2, recs[0]))
    set_active(model, False)
    h1()  # remove the first edit first
    assert rt.n_edits == 2 and len(rt.patches) == 4
    h2()
    assert_same_state(before, model) and hook_counts(model) == hooks
    _apply(qwen, recs[0])
    restore_all(model)
    assert hook_counts(model) == hooks and runtime_for(model, create=False) is None


def test_scope_threshold_confines_finished_neurons_to_their_edit(qwen) -> None:
    """Lifelong mode: every finished block carries an input scope around its edit's own (shifted) inputs,
    counted in the edit's bytes; the edit still holds, and the blocks come off exactly."""
    from mke_plugins.core.scope import InputScope
    from mke_plugins.methods.unike.runtime import runtime_for

    model = qwen["model"]
    recs = _records("qwen2-vl", 2, offset=60)
    before, hooks = state_of(model), hook_counts(model)
    e1, h1 = _apply(qwen, recs, scope_threshold=0.9, negatives_from_edits=False, scope_exclusive=True)
    rt = runtime_for(model, create=False)
    blocks = [b for bs in rt.blocks.values() for b in bs]
    assert len(blocks) == 4 and all(isinstance(b.scope, InputScope) and b.scope.threshold == 0.9 for b in blocks)
    assert all(b.scope.exclusive for b in blocks)
    assert sum(e.added_bytes for e in h1.stats.edits) >= sum(b.scope.nbytes for b in blocks) > 0
    for r in recs:
        assert _nll(qwen, e1, r) < _nll(qwen, model, r)
    for b in blocks:  # far from every key: the scoped block adds nothing there
        assert torch.equal(b.delta(-b.scope.keys.sum(0, keepdim=True) * 10), torch.zeros(1, b.value.shape[0]))
    h1()
    assert_same_state(before, model) and hook_counts(model) == hooks


def test_scope_memory_confines_latent_memory_to_admitted_positions(qwen) -> None:
    """Lifelong mode with scope_memory: each edit's latent-memory entries get a scope; positions no edit
    admits are not shifted at all (the shift is the identity there), positions inside the scope are; the
    scopes count in the bytes, the edit holds, and restore removes it all."""
    from mke_plugins.methods.unike.runtime import runtime_for

    model = qwen["model"]
    recs = _records("qwen2-vl", 2, offset=60)
    before, hooks = state_of(model), hook_counts(model)
    e1, h1 = _apply(qwen, recs, scope_threshold=0.9, negatives_from_edits=False, scope_memory=True)
    rt = runtime_for(model, create=False)
    assert rt.memories and all(len(m.scopes) == 2 for m in rt.memories.values())
    scope_bytes = sum(sc.nbytes for m in rt.memories.values() for _, sc in m.scopes.values())
    block_bytes = sum(b.scope.nbytes for bs in rt.blocks.values() for b in bs)
    assert sum(e.added_bytes for e in h1.stats.edits) >= scope_bytes + block_bytes > 0
    for r in recs:
        assert _nll(qwen, e1, r) < _nll(qwen, model, r)
    for layer, mem in rt.memories.items():
        keys = torch.cat([sc.keys for _, sc in mem.scopes.values()])
        far = -keys.sum(0, keepdim=True) * 10  # cosine < 0 to every key: admitted by no edit
        assert torch.equal(rt.shift_states(layer, far), far) and mem.allowed(far)[0].numel() == 0
        near = keys[:1] * 10
        used, mask = mem.allowed(near)
        assert mask.shape == (1, used.numel()) and mask.all()  # the entries it may use, and only those
        entries = list(mem.entries)
        admitting = [keys_ for keys_, sc in mem.scopes.values() if bool(sc.admits(near).any())]
        assert {entries[i] for i in used.tolist()} == {k for ks in admitting for k in ks}
        assert not torch.equal(rt.shift_states(layer, near), near)
    h1()
    assert_same_state(before, model) and hook_counts(model) == hooks
    assert runtime_for(model, create=False) is None


@pytest.mark.parametrize("over,blocks,memory", [({"use_external": False}, 2, False),
                                                ({"use_intrinsic": False}, 0, True),
                                                ({"alpha_mode": "fixed", "use_zeta": False}, 2, True)])
def test_ablation_switches(qwen, over, blocks, memory) -> None:
    from mke_plugins.methods.unike.runtime import runtime_for

    model = qwen["model"]
    before = state_of(model)
    edited, handle = _apply(qwen, _records("qwen2-vl", 1, offset=60)[0], **over)
    rt = runtime_for(model, create=False)
    assert len(rt.patches.blocks()) == blocks and bool(rt.memories) == memory
    handle()
    assert_same_state(before, model)


def test_alpha_is_in_unit_interval_and_shift_acts_only_through_the_gate(qwen) -> None:
    from mke_plugins.methods.unike.runtime import runtime_for

    model, tok = qwen["model"], qwen["tok"]
    rec = _records("qwen2-vl", 1, offset=70)[0]
    edited, handle = _apply(qwen, rec, use_intrinsic=False)
    rt = runtime_for(model, create=False)
    rt.record_alpha = True
    ad = get_adapter(model)
    b = ad.batch(model, tok, [Query(rec["image"], rec["prompt"], rec["target"])])
    with torch.no_grad():
        bare = ad.forward(model, b)
        assert not rt.last_alpha
        shifted = ad.forward(edited, b)
    alpha = rt.last_alpha[3]
    assert ((alpha >= 0) & (alpha <= 1)).all() and alpha.max() > 0
    assert not torch.equal(bare, shifted)
    handle()


def test_alpha_threshold_leaves_low_alpha_positions_unshifted(qwen) -> None:
    """alpha_threshold zeroes every alpha below it (those positions get no shift) and keeps the rest as they were."""
    from mke_plugins.methods.unike.runtime import runtime_for

    model, tok = qwen["model"], qwen["tok"]
    rec = _records("qwen2-vl", 1, offset=80)[0]
    ad = get_adapter(model)
    b = ad.batch(model, tok, [Query(rec["image"], rec["prompt"], rec["target"])])
    edited, handle = _apply(qwen, rec, use_intrinsic=False)
    rt = runtime_for(model, create=False)
    rt.record_alpha = True
    with torch.no_grad():
        bare = ad.forward(model, b)
        ad.forward(edited, b)
        plain = {k: v.clone() for k, v in rt.last_alpha.items()}
        values = torch.cat([v.flatten() for v in plain.values()])
        tau = float(values[values > 0].median())  # half of the shifted positions fall below it
        rt.alpha_threshold = tau
        ad.forward(edited, b)
        gated = {k: v.clone() for k, v in rt.last_alpha.items()}
        rt.alpha_threshold = 1.0 - 1e-6  # no alpha reaches it: the model is the bare one
        unshifted = ad.forward(edited, b)
    handle()
    first = min(plain)  # later layers see the first one's (now smaller) shift, so only its alphas are comparable
    a, got = plain[first], gated[first]
    low = a < tau
    assert low.any() and (~low).any()
    assert (got[low] == 0).all() and torch.equal(got[~low], a[~low])
    for layer, g in gated.items():
        assert ((g == 0) | (g >= tau)).all(), layer
    assert torch.equal(unshifted, bare)


def test_threshold_key_init_is_negative_below_theta() -> None:
    from mke_plugins.methods.unike.edit import _init_keys

    g = torch.Generator().manual_seed(0)
    x, mu = torch.randn(1, 16, generator=g) * 3, torch.randn(16, generator=g)
    k, b, k_up = _init_keys(x, mu, 2, 0.0, g)  # the plain centred init: 1 at the edit state, 0 at mu
    assert torch.allclose(x @ k.t() + b, torch.ones(1, 2), atol=1e-5)
    assert torch.allclose(mu @ k.t() + b, torch.zeros(2), atol=1e-5) and torch.equal(k, k_up)
    k, b, k_up = _init_keys(x, mu, 2, 0.0, g, scale=20.0, threshold=0.8)
    c = x[0] - mu
    ortho = torch.randn(16, generator=g)
    ortho = ortho - (ortho @ c) / (c @ c) * c
    mate = mu + 0.6 * c + ortho  # projects at 0.6 on the edit's key
    assert torch.allclose(x @ k.t() + b, torch.full((1, 2), 4.0), atol=1e-4)  # s * (1 - theta)
    assert torch.allclose(mate @ k.t() + b, torch.full((2,), -4.0), atol=1e-3)  # s * (0.6 - theta)
    assert torch.allclose(x @ k_up.t() - mu @ k_up.t(), torch.ones(1, 2), atol=1e-5)  # up key unscaled


def test_a_re_edit_of_the_same_question_is_not_its_own_negative(qwen) -> None:
    from mke_plugins.methods.unike.edit import _same_question

    model, tok = qwen["model"], qwen["tok"]
    ad = get_adapter(model)
    a, b = _records("qwen2-vl", 2, offset=90)
    batch = lambda r, target: ad.batch(model, tok, [Query(r["image"], r["prompt"], target)])  # noqa: E731
    assert _same_question(batch(a, "red"), batch(a, "blue green"))  # same prompt and picture, new target
    assert not _same_question(batch(a, "red"), batch(b, "red"))  # another question
    assert not _same_question(batch(a, "red"), batch(dict(a, image=b["image"]), "red"))  # another picture


def test_margin_loss_keeps_new_neurons_silent_on_negatives_and_earlier_edits(qwen) -> None:
    from mke_plugins.adapters import resolve_layers
    from mke_plugins.core.hooks import capture
    from mke_plugins.core.wrap import gate_open
    from mke_plugins.methods.unike import restore_all
    from mke_plugins.methods.unike.archive import load_archive
    from mke_plugins.methods.unike.edit import _negatives
    from mke_plugins.methods.unike.runtime import GATE, runtime_for

    model, tok = qwen["model"], qwen["tok"]
    ad = get_adapter(model)
    infos = ad.layers(model)
    layers = resolve_layers([-2, -1], len(infos))
    recs = _records("qwen2-vl", 2, offset=80)
    over = dict(negatives=8, negative_loss_weight=1.0, negative_margin=2.0, key_scale=20.0, key_threshold=0.8,
                max_edit_steps=40, stop_loss=0.0)
    _apply(qwen, recs[0], **over)
    _apply(qwen, recs[1], **over)
    rt = runtime_for(model, create=False)
    assert len(rt.edit_inputs) == 2  # the edit batches kept for later edits' negatives
    second = [b for b in rt.patches.blocks() if b.tag == ("unike", max(rt.edits))]

    def inputs(rec: dict[str, Any]) -> dict[int, torch.Tensor]:
        b = ad.batch(model, tok, [Query(rec["image"], rec["prompt"], rec["target"])])
        with gate_open(model, GATE), torch.no_grad(), \
                capture({layer: infos[layer].ffn_in for layer in layers}, positions=b.answer_mask) as rec_:
            ad.forward(model, b)
        return {layer: rec_[layer].float() for layer in layers}

    own, earlier = inputs(recs[1]), inputs(recs[0])
    archive = load_archive(qwen["archive"], model, ad, layers)
    with rt.pristine():
        h_sem = {layer: v[0] for layer, v in inputs(recs[1]).items()}  # pristine state at the first answer position
    negs = _negatives(archive, layers, infos, rt, h_sem, 8)
    with torch.no_grad():
        assert max(float(blk.pre(own[blk.layer]).max()) for blk in second) > 0  # the edit's input opens a gate
        for blk in second:
            assert float(blk.pre(earlier[blk.layer]).max()) < 0  # the earlier edit's input does not
            assert float(blk.pre(negs[blk.layer]).max()) < 0  # nor do its nearest bank questions
    restore_all(model)
    assert runtime_for(model, create=False) is None


def test_positive_margin_needs_a_weight_and_warns_in_the_lifelong_mode() -> None:
    with pytest.raises(HparamsError, match="negative_loss_weight"):
        _edit_hparams("qwen2-vl", positive_margin=4.0, negative_loss_weight=0.0)
    with pytest.warns(UserWarning, match="positive_margin: 0"):
        _edit_hparams("qwen2-vl", positive_margin=4.0, negative_loss_weight=0.2, scope_threshold=0.9)


def test_positive_margin_keeps_every_layer_s_gate_open_on_the_edit_input(qwen) -> None:
    """positive_margin (T-Patcher's activation loss): beside the margin over negatives, the largest gate
    pre-activation of each layer's new neurons at the edit's answer positions is held up to the target,
    where without it the negatives' margin is free to pull a layer's gate down; restore stays bit-exact."""
    from mke_plugins.adapters import resolve_layers
    from mke_plugins.methods.unike.edit import _current_inputs
    from mke_plugins.methods.unike.runtime import runtime_for

    model, tok = qwen["model"], qwen["tok"]
    ad = get_adapter(model)
    infos = ad.layers(model)
    layers = resolve_layers([-2, -1], len(infos))
    rec = _records("qwen2-vl", 1, offset=81)[0]
    batch = ad.batch(model, tok, [Query(rec["image"], rec["prompt"], rec["target"])])
    with torch.no_grad():
        ad.forward(model, batch)
    before = state_of(model)
    lowest = {}
    for target in (0.0, 4.0):
        edited, handle = _apply(qwen, rec, negatives=8, negative_loss_weight=1.0, negative_margin=2.0, key_scale=20.0,
                                key_threshold=0.8, max_edit_steps=120, stop_loss=0.0, positive_margin=target)
        rt = runtime_for(edited, create=False)
        blocks = rt.blocks[max(rt.blocks)]
        own = _current_inputs(ad, edited, [batch], layers, infos)  # the answer positions' FFN inputs, gates open
        with torch.no_grad():
            lowest[target] = min(float(blk.pre(own[blk.layer]).max(-1).values.min()) for blk in blocks)
        handle()
        assert_same_state(before, model)
    assert lowest[4.0] > 3.5, lowest  # every answer position of every layer (the shortfall is ~0 at the end)
    assert lowest[0.0] < 0.0, lowest  # without it a layer's gate ends shut at some answer position


# -- other families: the same code through the adapter -------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("family", ["llava-onevision", "blip2"])
def test_other_families_edit_and_restore(family, family_model, tmp_path) -> None:
    from mke_plugins.methods.unike.unike_main import apply_unike_to_multimodal_model

    model, tok, _ = family_model(family)
    _build(model, tok, family, tmp_path / "a.pt", enc_epochs=1)
    rec = _records(family, 1, offset=80)[0]
    before = state_of(model)
    hp = _edit_hparams(family, str(tmp_path / "a.pt"))
    edited, handle = apply_unike_to_multimodal_model(model, tok, rec, hp, return_orig_weights=True)
    ad = get_adapter(model, hp)
    b = ad.batch(model, tok, [Query(rec["image"], rec["prompt"], rec["target"])])
    with torch.no_grad():
        assert float(ad.loss(edited, b)) < float(ad.loss(model, b))
    handle()
    assert_same_state(before, model)


# -- EasyEdit trainer glue (without EasyEdit: the same class on its stand-in base) ----------------
def test_trainable_edit_loss_and_archive_round_trip(qwen, tmp_path) -> None:
    from mke_plugins.methods.unike.archive import save_archive
    from mke_plugins.methods.unike.trainable import UniKETrainable

    model, tok = qwen["model"], qwen["tok"]
    cfg = _train_hparams(str(qwen["dir"]), enc_batch_size=8)
    tr = UniKETrainable(model, cfg, lambda: None)
    tr.train(True)
    assert not model.training
    ad = get_adapter(model)
    recs = _records("qwen2-vl", 3, offset=90)
    for r in recs:
        b = ad.batch(model, tok, [Query(r["image"], r["prompt"], r["target"])])
        batch = dict(b.inputs, labels=b.labels)
        edited, info = tr.edit(batch, None)
        out = edited(batch)
        assert out.logits.shape[:2] == b.labels.shape
        stats = tr.edit_loss_fn(cfg, out.logits, b.labels)
        assert stats["nll"] is tr._last_loss
        grads = torch.autograd.grad(stats["nll"], tr.outer_parameters(), allow_unused=True)
        assert any(g is not None and g.abs().sum() > 0 for g in grads) or info["unike/bank_size"] == 0
    assert {"unike/l_tru", "unike/l_sem", "unike/bank_size"} <= set(info)
    payload = tr.state_dict()
    path = save_archive(payload, tmp_path / "trainer.pt", {"opt": {}, "val_stats": {"x": 1.0}})
    assert read_payload(path)["meta"]["n_triplets"] == int(info["unike/bank_size"])
    tr2 = UniKETrainable(model, cfg, lambda: None)
    tr2.load_state_dict(read_payload(path))
    assert tr2.off.bank_size == tr.off.bank_size
    assert all(p.requires_grad is False for p in model.parameters())
    for p in model.parameters():  # the trainer froze the shared fixture model: unfreeze for other tests
        p.requires_grad_(True)


# -- the conformance kit (bundled world model, hparams/world.yaml, the bundled archive) ------------
from mke_plugins.testing import parametrize_with_checks  # noqa: E402


@parametrize_with_checks(["UniKE"])
def test_conformance(method, check):
    check(method)


# -- the margin stop rule ------------------------------------------------------------------------
def test_margin_stop_rule_tolerance_and_plateau() -> None:
    from mke_plugins.methods.unike.stop import MarginStop

    def first_met(values: list[float], tol: float, patience: int) -> int | None:
        rule = MarginStop(tol, patience)
        return next((i for i, v in enumerate(values) if rule.margin_met(torch.tensor(v))), None)

    settling = [1.0, 0.6, 0.4, 0.35, 0.345, 0.344, 0.3435, 0.3433]
    assert first_met(settling, 0.01, 0) is None  # the tolerance alone never fires on a floor above it
    assert first_met(settling, 0.01, 2) == 5  # 0.35 -> 0.344 over the last 2 steps: settled
    assert first_met(settling, 0.01, 4) == 7
    assert first_met([1.0, 0.5, 0.005], 0.01, 0) == 2  # below the tolerance: met either way
    assert MarginStop(0.01, 3).margin_met(None)  # no margin loss: nothing to wait for
    falling = [1.0 - 0.05 * i for i in range(15)]
    assert first_met(falling, 0.01, 2) is None  # still falling fast: not settled


def test_margin_patience_lets_an_edit_stop_before_max_steps(qwen) -> None:
    from mke_plugins.methods.unike import restore_all
    from mke_plugins.methods.unike.runtime import runtime_for

    rec = _records("qwen2-vl", 1, offset=90)[0]
    # the NLL rule is always met; a margin of 50 with a tiny weight stays far above margin_tol and barely moves
    over = dict(negatives=8, negative_loss_weight=1e-6, negative_margin=50.0, key_scale=20.0, key_threshold=0.8,
                max_edit_steps=30, stop_loss=100.0)
    reports = []
    for patience in (0, 3):
        edited, handle = _apply(qwen, rec, margin_patience=patience, **over)
        reports.append(handle.stats.edits[0])
        handle()
    default, settled = reports
    assert default.steps == 30 and not default.converged  # the paper's rule: the cap
    assert default.extra["margin_final"] > 0.01
    assert settled.converged and settled.steps == 3 and settled.extra["margin_plateau"]
    restore_all(qwen["model"])
    assert runtime_for(qwen["model"], create=False) is None


@pytest.mark.parametrize("check", ["check_interrupted_edit", "check_sequential"])
def test_conformance_of_the_lifelong_mode(check: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The conformance kit's fault and sequence checks with the recommended lifelong configuration
    (scoped neurons and scoped latent memory, exclusive): an interrupted edit leaves no scope or entry
    behind, and sequences restore exactly."""
    import dataclasses

    import mke_plugins.hparams as hp_mod
    from mke_plugins.testing import conformance

    load = hp_mod.load_hparams

    def lifelong(method, key="world"):
        return dataclasses.replace(load(method, key), scope_threshold=0.85, scope_memory=True,
                                   scope_exclusive=True, negatives_from_edits=False)

    monkeypatch.setattr(hp_mod, "load_hparams", lifelong)
    getattr(conformance, check)("UniKE")


def test_noisy_copies_enter_the_fit_and_leave_nothing_behind(qwen) -> None:
    """fit_copies: the edit is fitted on the clean input and its noisy copies (full model, no prefix
    replay), which changes the edit; it still learns, and restore is bit-exact with no hook left."""
    from mke_plugins.core.replay import replay_watch

    model = qwen["model"]
    rec = _records("qwen2-vl", 1, offset=50)[0]
    ad = get_adapter(model)
    batch = ad.batch(model, qwen["tok"], [Query(rec["image"], rec["prompt"], rec["target"])])
    with torch.no_grad():
        ad.forward(model, batch)
    before, hooks = state_of(model), hook_counts(model)
    pre = _nll(qwen, model, rec)
    runs = []
    for copies in (0, 2):
        with replay_watch() as watch:
            edited, handle = _apply(qwen, rec, fit_copies=copies, fit_noise=2.0)
        with torch.no_grad():
            runs.append(ad.forward(edited, batch))
        assert handle.stats.flat()["steps"] > 0
        if copies:
            assert _nll(qwen, edited, rec) < pre - 0.1
            assert watch and all(s.start is None and s.replays == 0 for s in watch), watch
        handle()
        assert_same_state(before, model)
        assert hook_counts(model) == hooks
    assert not torch.equal(runs[0], runs[1]), "the copies did not change the edit"
