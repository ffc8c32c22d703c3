"""The EasyEdit bridge, exercised on the stand-in host (the real one: tests/host)."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from mke_plugins.easyedit import install, uninstall
from mke_plugins.testing.standin import new_host

from test_registry import build


@pytest.fixture
def reg(monkeypatch):
    r = build(monkeypatch, ["good", "lora"])
    yield r
    uninstall()


def test_install_injects_in_place_and_uninstall_removes(reg):
    host = new_host()
    mm, train, cra = (host.alg_dict.ALG_MULTIMODAL_DICT, host.alg_train_dict.ALG_TRAIN_DICT,
                      host.editor_utils.CALLABLE_RESTORE_ALGS)
    original_lora = mm["LoRA"]
    report = install(reg, host=host)
    assert host.alg_dict.ALG_MULTIMODAL_DICT is mm  # mutated, never rebound
    assert {"Good", "GoodTwo"} <= set(report.injected)
    assert "Good" in host.alg_dict.MULTIMODAL_EDIT_ALGS
    assert "GoodTwo" in host.alg_dict.ALG_DICT and "GoodTwo" in cra
    assert train["GOODTWO"].__name__ == "Trainer" and "GoodTwo" in host.alg_train_dict.MULTIMODAL_TRAIN_ALGS
    assert mm["LoRA"] is original_lora and "LoRA" in report.skipped
    assert "EasyEdit already has a method named 'LoRA'" in report.skipped["LoRA"]
    uninstall()
    assert "Good" not in mm and "GOODTWO" not in train and "GoodTwo" not in cra
    assert "LoRA" in mm and "LoRA" in host.alg_dict.MULTIMODAL_EDIT_ALGS


def test_injected_apply_normalises_requests_and_names_errors(reg):
    host = new_host()
    install(reg, host=host)
    apply = host.alg_dict.ALG_MULTIMODAL_DICT["Good"]
    model, wc = apply("M", None, {"prompt": "p"}, None, copy=False, return_orig_weights=True, train_ds=None)
    assert model == "M" and wc == {"seen": [{"prompt": "p"}]}
    assert apply.__name__ == "apply_Good_via_mke_plugins"


def test_errors_carry_method_and_plugin(monkeypatch, reg):
    import sample_plugins

    def boom(*a, **k):
        raise ValueError("request #0, field 'image': missing")
    monkeypatch.setattr(sample_plugins, "apply", boom)
    host = new_host()
    install(reg, host=host)
    with pytest.raises(ValueError) as e:
        host.alg_dict.ALG_MULTIMODAL_DICT["Good"]("M", None, [{}], None)
    assert "raised by method 'Good' from plugin unknown ? (entry point good = sample_plugins:good)" in \
        "\n".join(getattr(e.value, "__notes__", []))


def test_install_is_idempotent(reg):
    host = new_host()
    install(reg, host=host)
    install(reg, host=host)
    uninstall()
    assert "Good" not in host.alg_dict.ALG_MULTIMODAL_DICT


# -- import order: our methods reach EasyEdit whether it is imported before or after us ----------
FAKE_EASYEDIT = {
    "__init__.py": ("from .util import alg_dict\nfrom .editors import utils\n\n\n"
                    "class MultimodalEditor:\n    @classmethod\n    def from_hparams(cls, hparams):\n"
                    "        return alg_dict.ALG_MULTIMODAL_DICT[hparams.alg_name]  # EasyEdit's bare KeyError\n"),
    "util/__init__.py": "",
    "util/alg_dict.py": "ALG_MULTIMODAL_DICT = {}\nMULTIMODAL_EDIT_ALGS = set()\nALG_DICT = {}\n",
    "editors/__init__.py": "",
    "editors/utils.py": "CALLABLE_RESTORE_ALGS = set()\nPEFT_RESTORE_ALGS = set()\nKEEP_EDITED_MODEL_ALGS = set()\n",
}


def run_with_fake_easyedit(tmp_path, code: str, **env: str) -> subprocess.CompletedProcess:
    """Run ``code`` in a fresh interpreter with a fake ``easyeditor`` package importable."""
    site = tmp_path / "fake_site"
    for rel, text in FAKE_EASYEDIT.items():
        (site / "easyeditor" / rel).parent.mkdir(parents=True, exist_ok=True)
        (site / "easyeditor" / rel).write_text(text)
    path = os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")])
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": path, **env})


EDIT = ("import mke_plugins, easyeditor\n"
        "print('after import:', 'DECODE' in easyeditor.util.alg_dict.ALG_MULTIMODAL_DICT,"
        " type(easyeditor.__loader__).__name__)\n"
        "print(easyeditor.MultimodalEditor.from_hparams(mke_plugins.load_hparams('DECODE', 'world')).__name__)\n")


def test_methods_are_installed_when_easyeditor_is_imported_after_us(tmp_path):
    out = run_with_fake_easyedit(tmp_path, EDIT)
    assert out.stdout.splitlines() == ["after import: True SourceFileLoader", "apply_DECODE_via_mke_plugins"], \
        out.stderr[-2000:]


def test_methods_are_installed_when_easyeditor_is_imported_first(tmp_path):
    code = "import easyeditor, mke_plugins; print('DECODE' in easyeditor.util.alg_dict.ALG_MULTIMODAL_DICT)"
    assert run_with_fake_easyedit(tmp_path, code).stdout.split() == ["True"]


def test_hparams_install_when_easyeditor_came_unseen(tmp_path):
    code = ("import mke_plugins, mke_plugins.autoinstall as a; a.unwatch(); import easyeditor\n"
            "d = easyeditor.util.alg_dict.ALG_MULTIMODAL_DICT; print('DECODE' in d)\n"
            "mke_plugins.load_hparams('DECODE', 'world'); print('DECODE' in d)\n")
    out = run_with_fake_easyedit(tmp_path, code)
    assert out.stdout.split() == ["False", "True"], out.stderr[-2000:]


def test_auto_install_off_is_honoured(tmp_path):
    out = run_with_fake_easyedit(tmp_path, EDIT, MKE_AUTO_INSTALL="0")
    assert out.stdout.splitlines() == ["after import: False SourceFileLoader"]
    assert "KeyError: 'DECODE'" in out.stderr
