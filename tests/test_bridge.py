"""The EasyEdit bridge, exercised on the stand-in host (the real one: tests/host)."""

from __future__ import annotations

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
