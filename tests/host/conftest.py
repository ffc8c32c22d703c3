"""Fixtures of the EasyEdit host check: skip unless EasyEdit main is set up; tiny models; scratch dirs.

Host tests request the ``easyedit`` fixture, which skips them (with a reason saying how to set
the host up) unless ``EASYEDIT_SRC`` points at an EasyEdit checkout and ``import easyeditor``
works in the running interpreter. Tests here that do not request it (the comparison with the
recorded EasyEdit fixtures) run everywhere, CI included.

Run the host check with:
    EASYEDIT_SRC=/path/to/easyedit PYTHONPATH=/path/to/easyedit .venv-host/bin/python -m pytest tests/host
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))

from easyedit_host import HELLO_METHOD, easyedit_unavailable_reason  # noqa: E402

# EasyEdit and transformers must never reach for a hub from a test.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def easyedit() -> Any:
    """The imported ``easyeditor`` package, or a skip saying how to set the host check up."""
    reason = easyedit_unavailable_reason()
    if reason:
        pytest.skip(reason)
    import easyeditor

    return easyeditor


# tiny_root / tiny_dir come from tests/conftest.py (this folder is below it).


@pytest.fixture
def scratch(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh neutral working directory: each ``MultimodalEditor`` writes ``logs/run.log`` to cwd."""
    path = tmp_path_factory.mktemp("scratch")
    monkeypatch.chdir(path)
    return path


@pytest.fixture(scope="session")
def mke_installed(easyedit: Any) -> Any:
    """``mke_plugins.install()`` into the real EasyEdit; skips if the example plugin is missing."""
    import mke_plugins

    registry = mke_plugins.get_registry()
    if HELLO_METHOD not in registry:
        pytest.skip(f"the example plugin's method {HELLO_METHOD!r} is not registered: install it into this "
                    "interpreter with `pip install -e examples/mke-hello` (setup_host_env.sh does).")
    report = mke_plugins.install()
    yield report
    mke_plugins.uninstall()
