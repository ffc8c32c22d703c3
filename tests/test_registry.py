"""Plugin loading and the registry: bad plugins are reported by name, the rest still load."""

from __future__ import annotations

from importlib import metadata

import pytest

from mke_hooks import UnknownMethodError
from mke_plugins import plugins as plugins_mod
from mke_plugins.registry import Registry
from mke_plugins.plugins import load_plugins


def fake_eps(monkeypatch, names):
    eps = [metadata.EntryPoint(n, f"sample_plugins:{n}", "mke_plugins") for n in names]
    real = metadata.entry_points

    def entry_points(**kw):
        if kw.get("group") == "mke_plugins":
            return eps
        return real(**kw)
    monkeypatch.setattr(plugins_mod.metadata, "entry_points", entry_points)


def build(monkeypatch, names):
    fake_eps(monkeypatch, names)
    return Registry(load_plugins())


def failure_text(reg):
    return "\n".join(str(f) for f in reg.failures)


def test_good_plugin_registers_and_is_credited(monkeypatch):
    reg = build(monkeypatch, ["good"])
    assert {"Good", "GoodTwo"} <= set(reg.names())
    assert reg.get("Good").plugin.name == "good"
    assert reg.get("Good").plugin.entry_point == "good = sample_plugins:good"
    assert not reg.failures


def test_broken_plugins_are_reported_and_do_not_stop_others(monkeypatch):
    reg = build(monkeypatch, ["good", "raises", "not_a_spec", "bad_restore", "misspelled", "missing"])
    text = failure_text(reg)
    assert "Good" in reg.names()
    assert "plugin unknown ? (entry point raises = sample_plugins:raises): mke_register_methods raised RuntimeError: boom inside plugin" in text
    assert "register() got dict, not a MethodSpec" in text
    assert "restore='undo' is not a restore policy" in text
    assert "implements unknown hook 'mke_register_method' (did you mean 'mke_register_methods'?)" in text
    assert "(entry point missing = sample_plugins:missing): failed to import: AttributeError" in text
    assert "BadRestore" not in reg.names()


def test_case_clash_is_refused(monkeypatch):
    reg = build(monkeypatch, ["good", "case_clash"])
    assert "method 'good' differs from 'Good' only in case" in failure_text(reg)


def test_easyedit_names_are_flagged(monkeypatch):
    reg = build(monkeypatch, ["lora"])
    assert reg.get("LoRA").shadows_easyedit


def test_unknown_name_suggests(monkeypatch):
    reg = build(monkeypatch, ["good"])
    with pytest.raises(UnknownMethodError, match=r"unknown method 'good'. Did you mean: Good"):
        reg.get("good")


def test_load_and_block_env(monkeypatch):
    monkeypatch.setenv("MKE_BLOCK_PLUGINS", "raises")
    reg = build(monkeypatch, ["good", "raises"])
    assert not reg.failures and "Good" in reg.names()
    monkeypatch.delenv("MKE_BLOCK_PLUGINS")
    monkeypatch.setenv("MKE_LOAD_PLUGINS", "lora")
    reg = build(monkeypatch, ["good", "lora"])
    assert "LoRA" in reg.names() and "Good" not in reg.names()
