"""Plugin loading and the registry: bad plugins are reported by name, the rest still load.

Tests marked "installed" use a real distribution: a module plus a ``.dist-info`` folder with
``entry_points.txt`` on a temporary ``sys.path`` entry, which ``importlib.metadata`` discovers
like any pip-installed plugin.
"""

from __future__ import annotations

import re
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

from mke_hooks import PluginError, UnknownMethodError
from mke_plugins import plugins as plugins_mod
from mke_plugins import registry as registry_mod
from mke_plugins.easyedit import install, uninstall
from mke_plugins.hparams import load_hparams
from mke_plugins.plugins import load_plugins
from mke_plugins.registry import Registry
from mke_plugins.testing.standin import new_host


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
    assert ("plugin unknown ? (entry point raises = sample_plugins:raises): "
            "mke_register_methods raised RuntimeError: boom inside plugin") in text
    assert "register() got dict, not a MethodSpec" in text
    assert "restore='undo' is not a restore policy" in text
    assert "implements unknown hook 'mke_register_method' (did you mean 'mke_register_methods'?)" in text
    assert "(entry point missing = sample_plugins:missing): failed to import: AttributeError" in text
    assert "BadRestore" not in reg.names()


def test_case_clash_is_refused(monkeypatch):
    """Third-party plugins register in load order (entry-point name): case_clash before good."""
    reg = build(monkeypatch, ["good", "case_clash"])
    assert ("(entry point good = sample_plugins:good): method 'Good' differs from 'good' only in case"
            in failure_text(reg))
    assert "good" in reg.names() and "GoodTwo" in reg.names()


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


# -- installed plugins --------------------------------------------------------------------------
def install_dist(monkeypatch, site: Path, dist: str, module: str, code: str, version: str = "1.0") -> None:
    """A real installed distribution ``dist`` whose entry point ``module`` names module ``module``."""
    site.mkdir(exist_ok=True)
    (site / f"{module}.py").write_text(textwrap.dedent(code))
    info = site / f"{dist.replace('-', '_')}-{version}.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: {version}\n")
    (info / "entry_points.txt").write_text(f"[mke_plugins]\n{module} = {module}\n")
    monkeypatch.syspath_prepend(str(site))


PLUGIN = """
    from mke_hooks import MethodSpec, hookimpl

    def apply(model, tok, requests, hparams, **kwargs):
        raise RuntimeError("the third-party apply ran")

    def spec(name):
        return MethodSpec(name=name, hparams_cls="mke_plugins.hparams:MultimodalHyperParams",
                          apply_multimodal=apply, summary="third-party " + name)

    @hookimpl{options}
    def mke_register_methods(register):
        for name in {names!r}:
            register(spec(name))
    """


@pytest.mark.parametrize("options", ["", "(tryfirst=True)", "(trylast=True)"])
def test_installed_plugin_cannot_take_a_builtin_name(monkeypatch, tmp_path, options):
    module = "plug_dupe_" + {"": "plain", "(tryfirst=True)": "first", "(trylast=True)": "last"}[options]
    install_dist(monkeypatch, tmp_path / "site", "plug-dupe", module,
                 PLUGIN.format(options=options, names=["DECODE", "FT", "DupeOwn"]))
    reg = Registry(load_plugins())
    for name in ("DECODE", "FT", "LoRA"):
        assert reg.get(name).plugin.builtin, f"{name} must stay the built-in method"
    assert reg.get("DupeOwn").plugin.distribution == "plug-dupe"
    text = failure_text(reg)
    newcomer = f"plugin plug-dupe 1.0 (entry point {module} = {module}): "
    assert (newcomer + "method 'DECODE' is already registered by the built-in plugin of mke-plugins") in text
    assert (newcomer + "method 'FT' is already registered by the built-in plugin of mke-plugins") in text
    assert f"set MKE_BLOCK_PLUGINS={module} to skip this plugin" in text
    assert not any(f.plugin.builtin for f in reg.failures), "the built-in plugin is never blamed"


def test_installed_plugins_clash_is_credited_to_the_later_one(monkeypatch, tmp_path):
    site = tmp_path / "site"
    install_dist(monkeypatch, site, "plug-aaa", "plug_aaa", PLUGIN.format(options="(trylast=True)", names=["Shared"]))
    install_dist(monkeypatch, site, "plug-bbb", "plug_bbb", PLUGIN.format(options="(tryfirst=True)",
                                                                            names=["Shared", "OnlyB"]))
    reg = Registry(load_plugins())
    assert reg.get("Shared").plugin.distribution == "plug-aaa" and "OnlyB" in reg.names()
    assert ("plugin plug-bbb 1.0 (entry point plug_bbb = plug_bbb): method 'Shared' is already registered "
            "by plug-aaa 1.0 (entry point plug_aaa = plug_aaa)") in failure_text(reg)


HPARAMS_HOOKS = """
    from mke_hooks import MethodSpec, hookimpl

    @hookimpl
    def mke_register_methods(register):
        register(MethodSpec(name="Hooky", hparams_cls="mke_plugins.hparams:MultimodalHyperParams",
                            apply_multimodal="os.path:join", summary="hooks that raise"))

    @hookimpl
    def mke_locate_hparams(method, model):
        raise RuntimeError("locate boom")

    @hookimpl
    def mke_adjust_hparams(method, model, config):
        raise KeyError("adjust boom")
    """


def test_raising_hparams_hooks_are_blamed_on_their_plugin(monkeypatch, tmp_path):
    install_dist(monkeypatch, tmp_path / "site", "plug-hooks", "plug_hooks", HPARAMS_HOOKS, version="2.0")
    reg = Registry(load_plugins())
    monkeypatch.setattr(registry_mod, "get_registry", lambda: reg)
    who = "plugin plug-hooks 2.0 (entry point plug_hooks = plug_hooks): "
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert load_hparams("FT", "world").alg_name == "FT"  # a built-in still loads
    shown = [str(w.message) for w in caught]
    assert any(m.startswith(who + "mke_locate_hparams('FT', 'world') raised RuntimeError: locate boom")
               for m in shown), shown
    assert any(m.startswith(who + "mke_adjust_hparams('FT', 'world') raised KeyError: 'adjust boom'")
               for m in shown), shown
    assert who + "mke_locate_hparams('FT', 'world') raised" in failure_text(reg)
    with pytest.raises(PluginError, match=r"^" + re.escape(who + "mke_locate_hparams('Hooky', 'world') raised")):
        load_hparams("Hooky", "world")
    yaml_path = tmp_path / "hooky.yaml"
    yaml_path.write_text("alg_name: Hooky\nmodel_name: m\n")
    with pytest.raises(PluginError, match=re.escape(who + "mke_adjust_hparams('Hooky', ")):
        load_hparams("Hooky", str(yaml_path))


# -- references, hook wrappers, selection variables ---------------------------------------------
def test_uncallable_reference_is_refused_with_the_plugin(monkeypatch):
    reg = build(monkeypatch, ["bad_refs"])
    assert "Uncallable" not in reg.names() and "Unresolvable" in reg.names()
    assert ("plugin unknown ? (entry point bad_refs = sample_plugins:bad_refs): method 'Uncallable': "
            "apply_multimodal must be callable (a function or class) or a 'module:attr' string, got 42.") \
        in failure_text(reg)


def test_unresolvable_reference_names_plugin_and_reference(monkeypatch):
    reg = build(monkeypatch, ["bad_refs"])
    expected = re.escape("plugin unknown ? (entry point bad_refs = sample_plugins:bad_refs): method "
                         "'Unresolvable': apply_multimodal='no_such_module_for_mke:apply' cannot be resolved: "
                         "ModuleNotFoundError: No module named 'no_such_module_for_mke'.")
    with pytest.raises(PluginError, match=expected):
        reg.get("Unresolvable").spec.resolved("apply_multimodal")
    host = new_host()
    try:
        install(reg, host=host)
        with pytest.raises(PluginError, match=expected):  # what EasyEdit's editor meets
            host.alg_dict.ALG_MULTIMODAL_DICT["Unresolvable"]("M", None, [{}], None)
    finally:
        uninstall()


def test_hook_wrappers_are_refused(monkeypatch):
    reg = build(monkeypatch, ["wrapper"])
    assert "Good" not in reg.names()
    assert "implements 'mke_adjust_hparams' as a hook wrapper. Fix: drop wrapper=" in failure_text(reg)


def test_selection_names_matching_no_plugin_are_warned(monkeypatch):
    monkeypatch.setenv("MKE_LOAD_PLUGINS", "goood,lora")
    monkeypatch.setenv("MKE_BLOCK_PLUGINS", "zzz-nothing")
    with pytest.warns(UserWarning) as caught:
        reg = build(monkeypatch, ["good", "lora"])
    shown = [str(w.message) for w in caught]
    assert any(m.startswith("MKE_LOAD_PLUGINS names 'goood', which matches no installed plugin. Did you mean "
                            "'good'? Available plugin names: ") for m in shown), shown
    assert any(m.startswith("MKE_BLOCK_PLUGINS names 'zzz-nothing', which matches no installed plugin. "
                            "Available plugin names: ") for m in shown), shown
    assert not any("'lora'" in m for m in shown) and "LoRA" in reg.names()
