"""The contract package stays light and fully documented."""

from __future__ import annotations

import inspect
import re
import subprocess
import sys
from pathlib import Path

import mke_hooks
from mke_hooks import MethodSpec, hookspecs, resolve

ROOT = Path(__file__).resolve().parents[1]


def test_importing_mke_hooks_imports_nothing_heavy():
    code = ("import sys, mke_hooks; "
            "print(','.join(m for m in ('torch','transformers','easyeditor','mke_plugins') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_listing_methods_imports_no_torch():
    code = ("import sys; from mke_plugins.cli import main; main(['methods', '--json']); "
            "print('HEAVY=' + ','.join(m for m in ('torch','transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip().endswith("HEAVY=")


def test_every_hook_is_documented_with_its_signature():
    readme = (ROOT / "hooks" / "README.md").read_text()
    hooks = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("mke_")]
    assert set(hooks) == {"mke_register_methods", "mke_locate_hparams", "mke_adjust_hparams", "mke_register_commands"}
    for name in hooks:
        params = ", ".join(inspect.signature(getattr(hookspecs, name)).parameters)
        assert f"### `{name}(" in readme, f"{name} has no section in hooks/README.md"
        assert re.search(rf"def {name}\({re.escape(params)}", readme) or \
            re.search(rf"def {name}\([^)]*\)", readme), f"{name}'s signature is not in the README"


def test_readme_snippets_run():
    readme = (ROOT / "hooks" / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.S)
    runnable = [b for b in blocks if "@hookimpl" in b]
    assert len(runnable) >= 4
    for block in runnable:
        exec(compile(block, "hooks/README.md", "exec"), {})


def test_method_spec_is_frozen_and_resolves_references():
    spec = MethodSpec(name="X", hparams_cls="json:dumps", apply_multimodal="os.path:join")
    import json
    import os.path
    assert spec.resolved("hparams_cls") is json.dumps
    assert resolve("os.path:join") is os.path.join
    try:
        spec.name = "Y"  # type: ignore[misc]
    except Exception as exc:
        assert "cannot assign" in str(exc)
    else:
        raise AssertionError("MethodSpec must be frozen")


def test_unknown_method_suggests_close_names_but_never_confusable_ones():
    err = mke_hooks.UnknownMethodError("decode", ["DECODE", "UniKE", "LDKE"])
    assert "Did you mean: DECODE?" in str(err)
    err = mke_hooks.UnknownMethodError("UnKE", ["DECODE", "UniKE"])
    assert "UniKE?" not in str(err.text.split("Registered")[0])
    err = mke_hooks.UnknownMethodError("DeCo", ["DECODE", "UniKE"])
    assert "Did you mean" not in str(err)
