"""A third-party plugin installed with pip is discovered, listed and injected; broken ones are
reported by name without stopping the others.

Plugins are pip-installed into a temporary ``--target`` folder and the CLI runs in a subprocess
with that folder on ``PYTHONPATH``, so the test environment itself is never modified.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _make_dist(root: Path, name: str, module_code: str) -> Path:
    pkg = root / name
    (pkg / name.replace("-", "_")).mkdir(parents=True)
    (pkg / name.replace("-", "_") / "__init__.py").write_text(textwrap.dedent(module_code))
    (pkg / "pyproject.toml").write_text(textwrap.dedent(f"""
        [build-system]
        requires = ["setuptools>=61"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "{name}"
        version = "9.9.9"
        [project.entry-points.mke_plugins]
        {name.replace('-', '_')} = "{name.replace('-', '_')}"
        """))
    return pkg


def _pip_target(target: Path, *projects: Path) -> None:
    cmd = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
           "--no-index", "--target", str(target), *map(str, projects)]
    subprocess.run(cmd, check=True, capture_output=True, text=True)


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("plugins")
    broken = _make_dist(tmp, "mke-broken", "raise ImportError('needs a package that is not installed')\n")
    typo = _make_dist(tmp, "mke-typo", """
        from mke_hooks import hookimpl
        @hookimpl
        def mke_register_method(register):
            pass
        """)
    target = tmp / "site"
    _pip_target(target, ROOT / "examples" / "mke-hello", broken, typo)
    return target


def run(site: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=ROOT)


def test_hello_is_listed_with_its_plugin(site):
    out = run(site, "-m", "mke_plugins.cli", "methods", "--json")
    assert out.returncode == 0, out.stderr
    rows = {r["name"]: r for r in json.loads(out.stdout)}
    assert rows["HelloFT"]["plugin"] == "hello"
    assert rows["HelloFT"]["distribution"] == "mke-hello" and rows["HelloFT"]["version"] == "0.1.0"
    assert rows["HelloFT"]["summary"] and rows["HelloFT"]["hparams_models"] == ["world"]


def test_broken_plugins_are_reported_by_name(site):
    out = run(site, "-m", "mke_plugins.cli", "plugins", "--json")
    data = json.loads(out.stdout)
    names = {p["name"] for p in data["plugins"]}
    assert "hello" in names and "mke_broken" not in names
    failures = "\n".join(f"{f['plugin']}: {f['error']} Fix: {f['fix']}" for f in data["failures"])
    assert ("mke-broken 9.9.9 (entry point mke_broken = mke_broken): failed to import: "
            "ImportError: needs a package that is not installed") in failures
    assert ("mke-typo 9.9.9 (entry point mke_typo = mke_typo): implements unknown hook "
            "'mke_register_method' (did you mean 'mke_register_methods'?)") in failures
    text = run(site, "-m", "mke_plugins.cli", "plugins")
    assert "hello  [mke-hello 0.1.0; hello = mke_hello]: HelloFT" in text.stdout
    assert "FAILED plugin mke-broken 9.9.9" in text.stderr


def test_block_list_skips_a_plugin(site):
    env_out = subprocess.run(
        [sys.executable, "-m", "mke_plugins.cli", "plugins", "--json"], capture_output=True, text=True,
        env=dict(os.environ, PYTHONPATH=os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]),
                 MKE_BLOCK_PLUGINS="mke-broken,mke-typo"), cwd=ROOT)
    assert json.loads(env_out.stdout)["failures"] == []


def test_hello_is_injected_into_the_host(site):
    code = ("from mke_plugins.easyedit import install; from mke_plugins.testing.standin import new_host; "
            "h = new_host(); r = install(host=h); "
            "print('HelloFT' in h.alg_dict.ALG_MULTIMODAL_DICT, 'HelloFT' in r.injected)")
    out = run(site, "-c", code)
    assert out.stdout.split() == ["True", "True"], out.stderr


@pytest.mark.slow
def test_hello_conformance_suite_passes(site):
    out = run(site, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "examples" / "mke-hello" / "tests"))
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-2000:]
    from mke_plugins.testing.conformance import CHECKS

    assert f"{len(CHECKS)} passed" in out.stdout  # every check of the kit, interrupted_edit included
