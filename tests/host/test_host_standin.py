"""The CI stand-in host (``mke_plugins.testing.standin``) matches EasyEdit main (host check).

CI checks the bridge and every method against the stand-in because EasyEdit is not installed
there; this keeps the stand-in honest. Compared programmatically with the real modules: the
registry objects (names and kinds), the restore decisions of ``restore_after_edit``, and the way
the editor calls an apply function in single and sequential mode (recorded by a probe method).
"""

from __future__ import annotations

import types
from pathlib import Path
from typing import Any

import pytest

from easyedit_host import write_images

pytestmark = pytest.mark.host

PROBE = "MKEProtocolProbe"


def _real_host(easyedit: Any) -> Any:
    from mke_plugins.easyedit import easyedit_modules

    return easyedit_modules()


def _standin() -> Any:
    from mke_plugins.testing.standin import new_host

    return new_host()


def _injected(real: Any) -> set[str]:
    """Names the bridge injected into the real host (their values carry ``_mke_method``)."""
    names: set[str] = set()
    for d in (real.alg_dict.ALG_MULTIMODAL_DICT, real.alg_dict.ALG_DICT, real.alg_train_dict.ALG_TRAIN_DICT):
        names |= {k for k, v in d.items() if getattr(v, "_mke_method", None)}
    for v in real.alg_train_dict.ALG_TRAIN_DICT.values():
        if getattr(v, "_mke_method", None):
            names.add(v._mke_method)
    return names


REGISTRIES = [
    ("alg_dict", "ALG_MULTIMODAL_DICT"), ("alg_dict", "MULTIMODAL_EDIT_ALGS"), ("alg_dict", "ALG_DICT"),
    ("alg_dict", "MULTIMODAL_DS_DICT"), ("alg_train_dict", "ALG_TRAIN_DICT"),
    ("alg_train_dict", "MULTIMODAL_TRAIN_ALGS"), ("editor_utils", "CALLABLE_RESTORE_ALGS"),
    ("editor_utils", "PEFT_RESTORE_ALGS"), ("editor_utils", "KEEP_EDITED_MODEL_ALGS"),
]


@pytest.mark.parametrize("module,attr", REGISTRIES, ids=[a for _, a in REGISTRIES])
def test_standin_registry_matches_easyedit(easyedit: Any, module: str, attr: str) -> None:
    host = _real_host(easyedit)
    real = getattr(getattr(host, module), attr)
    fake = getattr(getattr(_standin(), module), attr)
    assert type(fake) is type(real), f"{attr}: stand-in is a {type(fake).__name__}, EasyEdit a {type(real).__name__}"
    ours = _injected(host)
    real_names = {k for k in real if k not in ours}
    fake_names = set(fake)
    assert fake_names == real_names, (
        f"{attr}: stand-in lacks {sorted(real_names - fake_names)}, has extra {sorted(fake_names - real_names)} "
        f"(update mke_plugins/testing/standin.py from easyeditor/{'util' if 'alg' in module else 'editors'})")


def test_standin_host_layout_matches_easyedit(easyedit: Any) -> None:
    """Every registry the bridge touches lives in the same module and is the same kind of object."""
    real, fake = _real_host(easyedit), _standin()
    for module, attr in REGISTRIES:
        assert hasattr(getattr(real, module), attr), f"EasyEdit has no {module}.{attr} any more"
        assert hasattr(getattr(fake, module), attr), f"stand-in has no {module}.{attr}"
    assert real.label == "easyeditor" and not real.is_stale_release
    assert not fake.is_stale_release


class _Peft:
    """A fake PEFT-wrapped model whose unload() returns the base model."""

    def __init__(self, base: Any) -> None:
        self.base = base

    def unload(self) -> Any:
        return self.base


def _restore_outcome(restore: Any, alg: str, wc_kind: str) -> dict[str, Any]:
    import torch

    model = torch.nn.Linear(2, 2, bias=False)
    original = model.weight.detach().clone()
    with torch.no_grad():
        model.weight.add_(1.0)
    calls = []
    if wc_kind == "dict":
        weights_copy: Any = {"weight": original.clone()}
    elif wc_kind == "callable":
        weights_copy = lambda: calls.append(1)  # noqa: E731
    else:
        weights_copy = None
    other = torch.nn.Linear(2, 2, bias=False)
    edited = _Peft(other) if alg == "LoRA" else other
    editor = types.SimpleNamespace(alg_name=alg, model=model, hparams=types.SimpleNamespace(alg_name=alg))
    restore(editor, edited, weights_copy)
    return {"called": len(calls), "model": "same" if editor.model is model else
            ("edited" if editor.model is edited else ("unloaded" if editor.model is other else "other")),
            "restored": bool(editor.model is model and torch.equal(model.weight, original))}


@pytest.mark.parametrize("alg,wc_kind", [("GRACE", "callable"), ("LoRA", "dict"), ("MELO", "dict"),
                                         ("MyMethod", "dict"), ("MyMethod", "none")])
def test_standin_restore_decisions_match_easyedit(easyedit: Any, alg: str, wc_kind: str) -> None:
    from easyeditor.editors.utils import restore_after_edit as real_restore

    from mke_plugins.testing import standin

    host = _standin()
    real = _restore_outcome(real_restore, alg, wc_kind)
    fake = _restore_outcome(lambda ed, em, wc: standin.restore_after_edit(host, ed, em, wc), alg, wc_kind)
    assert fake == real, f"restore of {alg} with a {wc_kind} weights_copy: stand-in {fake}, EasyEdit {real}"


def _probe(log: list[dict[str, Any]]) -> Any:
    def apply(*args: Any, **kwargs: Any) -> Any:
        requests = args[2]
        log.append({
            "n_positional": len(args),
            "requests": type(requests).__name__,
            "n_requests": len(requests) if isinstance(requests, list) else 1,
            "request_keys": sorted((requests[0] if isinstance(requests, list) else requests).keys()),
            "kwargs": {k: (v if v is None or isinstance(v, (bool, int, str)) else type(v).__name__)
                       for k, v in sorted(kwargs.items())},
        })
        return args[0], {}
    return apply


def test_standin_calls_apply_like_easyedit(easyedit: Any, tiny_dir: Any, scratch: Path) -> None:
    """Single and sequential edit(): same positional count, request container, keywords."""
    import torch
    from easyeditor import MultimodalEditor
    from easyeditor.util import alg_dict

    from mke_plugins.testing import standin

    family = "qwen2-vl"
    model_dir = tiny_dir(family)
    names = write_images(scratch / "data")
    images = [str(scratch / "data" / n) for n in names[:2]]
    real_log: list[dict[str, Any]] = []
    fake_log: list[dict[str, Any]] = []
    hp = types.SimpleNamespace(alg_name=PROBE, model_name=str(model_dir), name=str(model_dir), device="cpu",
                               dtype=torch.float32, exact_match=False, batch_size=4)
    assert PROBE not in alg_dict.ALG_MULTIMODAL_DICT
    alg_dict.ALG_MULTIMODAL_DICT[PROBE] = _probe(real_log)
    try:
        editor = MultimodalEditor.from_hparams(hp)
        kw = dict(prompts=["What is it?", "Which shape?"], targets=["a cat", "a star"], image=images,
                  verbose=False)
        editor.edit(**kw)
        editor.edit(**kw, sequential_edit=True)
    finally:
        alg_dict.ALG_MULTIMODAL_DICT.pop(PROBE, None)
    requests = editor._prepare_requests(kw["prompts"], kw["targets"], kw["image"])

    host = _standin()
    host.alg_dict.ALG_MULTIMODAL_DICT[PROBE] = _probe(fake_log)
    hp2 = types.SimpleNamespace(**{**vars(hp), "batch_size": 4})
    fake_editor = standin.StandInEditor(host, hp2, editor.model, editor.tok)
    assert hp2.batch_size == 1, "EasyEdit forces hparams.batch_size = 1; the stand-in must too"
    fake_editor.edit(requests)
    fake_editor.edit(requests, sequential_edit=True)
    assert fake_log == real_log, "\n".join(["stand-in calls differ from EasyEdit's:"]
                                           + [f"  easyedit {r}\n  stand-in {f}"
                                              for r, f in zip(real_log, fake_log, strict=False)])
