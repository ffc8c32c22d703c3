"""Damaged offline artefacts: LDKE and UniKE archives, ASAM's on-disk memory bank.

Each case writes a corrupted copy of a real artefact to ``tmp_path`` (the bundled world archives,
or a bank ASAM just cached) and checks the user gets an :class:`ArchiveError` that names the file
(and the tensor) and says what to do: rebuild with the exact ``mke-plugins train`` command, or
delete the cache. Archive errors must come when the archive is loaded, before any edit starts.
"""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable

import pytest
import torch

from mke_hooks import ArchiveError, MKEError
from mke_plugins.adapters import Query, get_adapter
from mke_plugins.core.snapshot import assert_same_state, state_of
from mke_plugins.hparams import load_hparams
from mke_plugins.methods.asam import memory
from mke_plugins.methods.asam.asam_hparams import ASAMHyperParams
from mke_plugins.methods.ldke import ldke_main, router
from mke_plugins.methods.ldke.routed import LDKEState
from mke_plugins.methods.unike import archive as unike_archive
from mke_plugins.methods.unike import unike_main
from mke_plugins.testing.images import make_image, native_image

METHODS = Path(ldke_main.__file__).resolve().parent.parent
LDKE_WORLD = METHODS / "ldke" / "archives" / "world.pt"
UNIKE_WORLD = METHODS / "unike" / "archives" / "world.pt"
LDKE_YAML = METHODS / "ldke" / "hparams" / "world.yaml"
UNIKE_YAML = METHODS / "unike" / "hparams" / "world.yaml"


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def world_model() -> tuple[Any, Any, dict[str, Any]]:
    """The bundled world model, its processor and one edit-split request."""
    from mke_plugins import world

    model, tok = world.load()
    return model, tok, world.records("edit")[0]


def _corrupt_copy(src: Path, dst: Path, mutate: Callable[[dict[str, Any]], None]) -> Path:
    """``dst`` = ``src`` loaded, changed in place by ``mutate``, saved again."""
    obj = torch.load(src, map_location="cpu", weights_only=True)
    mutate(obj)
    torch.save(obj, dst)
    return dst


def _truncate(src: Path, dst: Path) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: len(data) // 2])
    return dst


def _set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    """A mutation setting the nested key ``a/b/c`` (a value of ``...`` deletes it)."""
    *parents, last = path.split("/")

    def mutate(obj: dict[str, Any]) -> None:
        for p in parents:
            obj = obj[p]
        if value is ...:
            del obj[last]
        else:
            obj[last] = value(obj[last]) if callable(value) else value

    return mutate


def _nan_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[0] = float("nan")
    return t


def _inf_at(t: torch.Tensor) -> torch.Tensor:
    t = t.clone()
    t.view(-1)[-1] = float("inf")
    return t


# -- LDKE ----------------------------------------------------------------------------------------

LDKE_CASES = {
    # name: (mutation, words the message must hold besides the file and the rebuild command)
    "head weight of the wrong width": (_set("head/state/proj.weight", lambda t: t[:, :-1].clone()),
                                       ["head.state['proj.weight']", "(64, 383)", "(64, 384)"]),
    "head MLP of the wrong size": (_set("head/state/mlp.0.weight", lambda t: torch.zeros(64, 255)),
                                   ["head.state['mlp.0.weight']", "(64, 255)", "(64, 256)"]),
    "head config disagrees with the features": (_set("head/in_dim", 100), ["in_dim", "100", "384"]),
    "head tensor missing": (_set("head/state/mlp.2.bias", ...), ["head.state", "mlp.2.bias", "missing"]),
    "head missing": (_set("head", ...), ["lacks", "head"]),
    "tau missing": (_set("tau", ...), ["lacks", "tau"]),
    "mu of the wrong shape": (_set("mu", lambda t: t.reshape(2, 2)), ["mu", "(2, 2)"]),
    "NaN in the router head": (_set("head/state/mlp.0.weight", _nan_at),
                               ["head.state['mlp.0.weight']", "NaN or inf"]),
    "inf in the router head": (_set("head/state/proj.bias", _inf_at), ["head.state['proj.bias']", "NaN or inf"]),
    "NaN in mu": (_set("mu", _nan_at), ["'mu'", "NaN or inf"]),
    "NaN tau": (_set("tau", float("nan")), ["tau", "nan"]),
}


def _assert_archive_message(err: BaseException, method: str, path: Path, words: list[str]) -> None:
    """The error names the file, the command that rebuilds it and ``words``."""
    text = str(err)
    assert str(path) in text, text
    assert f"mke-plugins train {method} --hparams world --out {path}" in text, text
    for w in words:
        assert w in text, (w, text)


@pytest.mark.parametrize("case", list(LDKE_CASES))
def test_ldke_damaged_archive_is_refused_on_load(case: str, tmp_path: Path) -> None:
    mutate, words = LDKE_CASES[case]
    bad = _corrupt_copy(LDKE_WORLD, tmp_path / "ldke-bad.pt", mutate)
    with pytest.raises(ArchiveError) as err:
        router.load_archive(bad)
    _assert_archive_message(err.value, "LDKE", bad, words)


def test_ldke_truncated_archive_names_the_file_and_the_rebuild_command(tmp_path: Path) -> None:
    bad = _truncate(LDKE_WORLD, tmp_path / "ldke-cut.pt")
    with pytest.raises(ArchiveError) as err:
        router.load_archive(bad)
    _assert_archive_message(err.value, "LDKE", bad, ["truncated"])


def test_ldke_mu_for_another_depth_is_refused_before_the_edit(world_model, tmp_path: Path) -> None:
    model, tok, req = world_model
    bad = _corrupt_copy(LDKE_WORLD, tmp_path / "ldke-mu.pt", _set("mu", lambda t: t[:3].clone()))
    hp = dataclasses.replace(load_hparams("LDKE", str(LDKE_YAML)), classifier_archive=str(bad))
    before = state_of(model)
    with pytest.raises(ArchiveError) as err:
        ldke_main.apply_ldke_to_multimodal_model(model, tok, [req], hp)
    _assert_archive_message(err.value, "LDKE", bad, ["'mu'", "3", "4"])
    assert LDKEState.of(model) is None
    assert_same_state(before, model)


@pytest.mark.parametrize("case", ["head weight of the wrong width", "NaN in the router head"])
def test_ldke_edit_with_a_damaged_archive_fails_before_touching_the_model(case: str, world_model,
                                                                         tmp_path: Path) -> None:
    model, tok, req = world_model
    mutate, words = LDKE_CASES[case]
    bad = _corrupt_copy(LDKE_WORLD, tmp_path / "ldke-bad.pt", mutate)
    hp = dataclasses.replace(load_hparams("LDKE", str(LDKE_YAML)), classifier_archive=str(bad), edit_steps=2)
    before = state_of(model)
    with pytest.raises(ArchiveError) as err:
        ldke_main.apply_ldke_to_multimodal_model(model, tok, [req], hp)
    _assert_archive_message(err.value, "LDKE", bad, words)
    assert LDKEState.of(model) is None
    assert_same_state(before, model)


# -- UniKE ---------------------------------------------------------------------------------------

def _payload_set(path: str, value: Any) -> Callable[[dict[str, Any]], None]:
    return _set(f"model/{path}", value)


UNIKE_CASES = {
    "encoder weight of the wrong width": (_payload_set("enc_sem.2.fc1.weight", lambda t: t[:, :-1].clone()),
                                          ["'enc_sem.2.fc1.weight'", "(128, 127)", "(128, 128)"]),
    "truth encoder of the wrong output size": (_payload_set("enc_tru.3.fc2.weight", lambda t: t[:-1].clone()),
                                               ["'enc_tru.3.fc2.weight'", "(127, 128)", "(128, 128)"]),
    "encoder tensor missing": (_payload_set("enc_tru.3.fc2.bias", ...), ["enc_tru.3.fc2.bias", "missing"]),
    "bank of the wrong layer count": (_payload_set("bank.h_sem", lambda t: t[:, :1].clone()),
                                      ["'bank.h_sem'", "(360, 1, 128)", "(n, 2, 128)"]),
    "bank ids of another length": (_payload_set("bank.ids", lambda t: t[:-1].clone()), ["'bank.ids'", "(359,)"]),
    "decoder of the wrong shape": (_payload_set("w_zeta", lambda t: t[:, :, :-1].clone()),
                                   ["'w_zeta'", "(2, 128, 127)", "(2, 128, 128)"]),
    "mu missing": (_payload_set("mu", ...), ["lacks", "mu"]),
    "NaN in zeta": (_payload_set("zeta", _nan_at), ["'zeta'", "NaN or inf"]),
    "inf in the bank": (_payload_set("bank.h_pos", _inf_at), ["'bank.h_pos'", "NaN or inf"]),
    "NaN in an encoder": (_payload_set("enc_sem.3.fc2.weight", _nan_at), ["'enc_sem.3.fc2.weight'", "NaN or inf"]),
}


@pytest.mark.parametrize("case", list(UNIKE_CASES))
def test_unike_damaged_archive_is_refused_on_load(case: str, tmp_path: Path) -> None:
    mutate, words = UNIKE_CASES[case]
    bad = _corrupt_copy(UNIKE_WORLD, tmp_path / "unike-bad.pt", mutate)
    with pytest.raises(ArchiveError) as err:
        unike_archive.read_payload(bad)
    _assert_archive_message(err.value, "UniKE", bad, words)


def test_unike_truncated_archive_names_the_file_and_the_rebuild_command(tmp_path: Path) -> None:
    bad = _truncate(UNIKE_WORLD, tmp_path / "unike-cut.pt")
    with pytest.raises(ArchiveError) as err:
        unike_archive.read_payload(bad)
    _assert_archive_message(err.value, "UniKE", bad, ["truncated"])


@pytest.mark.parametrize("case", ["encoder weight of the wrong width", "NaN in zeta"])
def test_unike_edit_with_a_damaged_archive_fails_before_touching_the_model(case: str, world_model,
                                                                          tmp_path: Path) -> None:
    from mke_plugins.methods.unike.runtime import runtime_for

    model, tok, req = world_model
    mutate, words = UNIKE_CASES[case]
    bad = _corrupt_copy(UNIKE_WORLD, tmp_path / "unike-bad.pt", mutate)
    hp = dataclasses.replace(load_hparams("UniKE", str(UNIKE_YAML)), archive=str(bad), max_edit_steps=2)
    before = state_of(model)
    with pytest.raises(ArchiveError) as err:
        unike_main.apply_unike_to_multimodal_model(model, tok, [req], hp)
    _assert_archive_message(err.value, "UniKE", bad, words)
    rt = runtime_for(model, create=False)
    assert rt is None or not rt.edits
    assert_same_state(before, model)


# -- ASAM's memory cache ---------------------------------------------------------------------------

@pytest.fixture
def asam_setup(family_model, tmp_path: Path) -> tuple[Any, Any, Any, ASAMHyperParams]:
    """A warmed-up tiny qwen2-vl, its adapter and hparams whose bank is cached under tmp_path/cache."""
    recs = []
    for i in range(3):
        make_image(40 + i).save(tmp_path / f"m{i}.png")
        recs.append({"src": f"What color is {i}?", "pred": "red", "image": f"m{i}.png"})
    (tmp_path / "train.json").write_text(json.dumps(recs))
    model, tok, name = family_model("qwen2-vl")
    adapter = get_adapter(model, SimpleNamespace(model_name=name))
    with torch.no_grad():
        adapter.forward(model, adapter.batch(model, tok, [Query(native_image("qwen2-vl"), "What is it?", "red")]))
    hp = ASAMHyperParams.from_config(dict(alg_name="ASAM", model_name=name, lambda_mem=5.0, memory_fields=["src"],
                                          memory_data=str(tmp_path), memory_cache=str(tmp_path / "cache")))
    memory.clear_cache()
    yield model, tok, adapter, hp
    memory.clear_cache()


def _cached_bank(asam_setup) -> tuple[Path, dict[int, torch.Tensor]]:
    """Build the bank (written to the cache folder), forget it in memory; returns the cache file."""
    model, tok, adapter, hp = asam_setup
    bank, fp, src = memory.get_bank(model, tok, adapter, hp, [3])
    assert src == "built"
    memory.clear_cache()
    return Path(hp.memory_cache) / f"asam-bank-{fp}.pt", bank


ASAM_CASES: dict[str, tuple[Callable[[Path], None], list[str]]] = {
    "truncated": (lambda f: _truncate(f, f), ["cannot be read"]),
    "states of the wrong width": (lambda f: torch.save({"3": torch.zeros(3, 31)}, f), ["(3, 31)", "width 32"]),
    "another layer": (lambda f: torch.save({"2": torch.zeros(3, 32)}, f), ["layers [2]", "[3]"]),
    "not a bank": (lambda f: torch.save(torch.zeros(3, 32), f), ["not a dict"]),
    "NaN states": (lambda f: torch.save({"3": torch.full((3, 32), float("nan"))}, f), ["NaN or inf"]),
}


@pytest.mark.parametrize("case", list(ASAM_CASES))
def test_asam_damaged_memory_cache_says_delete_it(case: str, asam_setup) -> None:
    model, tok, adapter, hp = asam_setup
    cache_file, _ = _cached_bank(asam_setup)
    damage, words = ASAM_CASES[case]
    damage(cache_file)
    with pytest.raises(ArchiveError) as err:
        memory.get_bank(model, tok, adapter, hp, [3])
    text = str(err.value)
    assert str(cache_file) in text and re.search(r"[Dd]elete", text), text
    for w in words:
        assert w in text, (w, text)
    memory.clear_cache()
    with pytest.raises(ArchiveError):  # a bad cache is never used, not even on a second try
        memory.get_bank(model, tok, adapter, hp, [3])


def test_asam_good_memory_cache_still_loads(asam_setup) -> None:
    model, tok, adapter, hp = asam_setup
    cache_file, bank = _cached_bank(asam_setup)
    disk, _, src = memory.get_bank(model, tok, adapter, hp, [3])
    assert src == "disk" and torch.equal(disk[3], bank[3])


def test_asam_failed_cache_write_leaves_nothing_behind(asam_setup, monkeypatch: pytest.MonkeyPatch) -> None:
    model, tok, adapter, hp = asam_setup
    real_save = torch.save

    def dying_save(obj: Any, f: Any, *a: Any, **kw: Any) -> None:
        half = b"PK\x03\x04 half a file"
        if hasattr(f, "write"):
            f.write(half)
        else:
            Path(f).write_bytes(half)
        raise OSError("No space left on device")

    monkeypatch.setattr(memory.torch, "save", dying_save)
    with pytest.raises(OSError, match="No space left"):
        memory.get_bank(model, tok, adapter, hp, [3])
    monkeypatch.setattr(memory.torch, "save", real_save)
    assert sorted(p.name for p in Path(hp.memory_cache).iterdir()) == []
    memory.clear_cache()
    _, _, src = memory.get_bank(model, tok, adapter, hp, [3])
    assert src == "built" and len(list(Path(hp.memory_cache).iterdir())) == 1


def test_archive_error_is_an_mke_error() -> None:
    assert issubclass(ArchiveError, MKEError) and ArchiveError.__doc__
