"""Install our methods into EasyEdit whatever the import order of ``mke_plugins`` and ``easyeditor``.

Three routes lead to one ``install()`` per process, each skipped when ``MKE_AUTO_INSTALL=0``:

* ``import mke_plugins`` while ``easyeditor`` is already imported installs at once;
* ``import mke_plugins`` first puts a finder on ``sys.meta_path`` that installs right after
  ``easyeditor`` finishes importing (the finder only wraps the real loader; the module keeps it);
* as a fallback, ``load_hparams`` and ``MultimodalHyperParams.from_config`` install when
  ``easyeditor`` is in ``sys.modules`` and no route has run yet.

Nothing here imports easyeditor or torch: only ``sys.modules`` is looked at.
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
import warnings
from types import ModuleType
from typing import Any, Sequence

HOST = "easyeditor"
_state = {"done": False}


def enabled() -> bool:
    """False when the user turned automatic installation off with ``MKE_AUTO_INSTALL=0``."""
    return os.environ.get("MKE_AUTO_INSTALL", "1") != "0"


def maybe_install(stacklevel: int = 2) -> None:
    """Install once, if ``easyeditor`` is imported and auto-install is on; warn on failure."""
    if _state["done"] or HOST not in sys.modules or not enabled():
        return
    _state["done"] = True
    unwatch()
    try:
        from .easyedit import install

        install()
    except Exception as exc:  # noqa: BLE001 - never break the user's import or load; say what happened
        warnings.warn(f"mke_plugins could not install its methods into EasyEdit: {exc}. "
                      "Call mke_plugins.install() to see the full error.", stacklevel=stacklevel + 1)


def activate() -> None:
    """At ``import mke_plugins``: install now if ``easyeditor`` is imported, else watch for it."""
    if not enabled():
        return
    if HOST in sys.modules:
        maybe_install()
    else:
        watch()


class _InstallAfterImport(importlib.abc.Loader):
    """Runs the real loader of ``easyeditor``, then installs; the module keeps the real loader."""

    def __init__(self, loader: Any) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        module.__loader__ = self._loader
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        maybe_install(stacklevel=3)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._loader, name)


class EasyEditWatcher(importlib.abc.MetaPathFinder):
    """A ``sys.meta_path`` finder that only notices ``easyeditor`` being imported."""

    def find_spec(self, fullname: str, path: Sequence[str] | None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        if fullname != HOST or _state["done"]:
            return None
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = None if finder is self or find is None else find(fullname, path, target)
            if spec is not None:
                if hasattr(spec.loader, "exec_module"):
                    spec.loader = _InstallAfterImport(spec.loader)
                return spec
        return None


def watch() -> None:
    """Put the watcher on ``sys.meta_path`` (once)."""
    if not any(isinstance(f, EasyEditWatcher) for f in sys.meta_path):
        sys.meta_path.insert(0, EasyEditWatcher())


def unwatch() -> None:
    """Take the watcher off ``sys.meta_path``."""
    sys.meta_path[:] = [f for f in sys.meta_path if not isinstance(f, EasyEditWatcher)]
