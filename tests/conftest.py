"""Test-run-wide fixtures: tiny models built once per test run into a temporary directory.

``tiny_dir(family)`` builds (once) and returns the directory of an HF tiny model;
``tiny_model(family)`` loads a *fresh* ``(model, processor)`` pair from it each call (cheap), so a
test that edits weights cannot leak into another. ``tiny_lavis(family)`` builds a fresh
LAVIS-style tiny model (``blip2`` / ``minigpt4``) and returns ``(model, tokenizer)``.
``family_model(family)`` is either, by family, with the ``model_name`` that selects its adapter.
Contributors: add shared fixtures here, each with a docstring; keep per-area fixtures in the
test module that uses them.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module's tests (``pytestmark = pytest.mark.usefixtures("one_thread")``):
    the tiny models run fastest on one thread; OpenMP threads competing for 2 shared cores run far slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="session")
def tiny_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Where tiny models are built. Its path must not contain a family marker (EasyEdit scans
    the whole ``model_name`` path for ``qwen2-vl``/``llava-onevision``/... markers)."""
    return tmp_path_factory.mktemp("tinymodels")


@pytest.fixture(scope="session")
def tiny_dir(tiny_root: Path) -> Callable[[str], Path]:
    """``tiny_dir(family)``: directory of the tiny HF model for ``family`` (built once per session)."""
    from mke_plugins.testing.tiny import build_tiny

    built: dict[str, Path] = {}

    def get(family: str) -> Path:
        if family not in built:
            built[family] = Path(build_tiny(family, tiny_root))
        return built[family]

    return get


@pytest.fixture(scope="session")
def tiny_model(tiny_dir: Callable[[str], Path]) -> Callable[[str], tuple[Any, Any]]:
    """``tiny_model(family)``: a freshly loaded ``(model, processor)`` of the tiny HF model (eval mode)."""
    from mke_plugins.testing.tiny import load_tiny

    def get(family: str) -> tuple[Any, Any]:
        return load_tiny(tiny_dir(family))

    return get


@pytest.fixture(scope="session")
def tiny_lavis() -> Callable[[str], tuple[Any, Any]]:
    """``tiny_lavis(family)``: a fresh LAVIS-style tiny model and its tokenizer (``blip2``/``minigpt4``)."""
    def get(family: str) -> tuple[Any, Any]:
        from mke_plugins.testing.tiny_lavis import build_tiny_lavis

        return build_tiny_lavis(family)

    return get


LAVIS_FAMILIES = ("blip2", "minigpt4")


@pytest.fixture(scope="session")
def family_model(tiny_model: Callable[[str], tuple[Any, Any]], tiny_lavis: Callable[[str], tuple[Any, Any]],
                 tiny_dir: Callable[[str], Path]) -> Callable[[str], tuple[Any, Any, str]]:
    """``family_model(family)``: a fresh ``(model, tok, model_name)`` of any family's tiny model.

    ``model_name`` is what an hparams object names it by (the LAVIS family name, else the HF
    model directory), so ``get_adapter(model, hparams)`` finds the family's adapter.
    """
    def get(family: str) -> tuple[Any, Any, str]:
        if family in LAVIS_FAMILIES:
            model, tok = tiny_lavis(family)
            return model, tok, family
        model, tok = tiny_model(family)
        return model, tok, str(tiny_dir(family))

    return get
