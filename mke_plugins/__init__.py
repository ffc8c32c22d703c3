"""mke-plugins: multimodal knowledge-editing methods for EasyEdit, delivered as pluggy plugins.

Importing this package is cheap (no torch): the public functions import what they need.

* ``install()`` / ``uninstall()`` put every registered method into EasyEdit's registries.
* ``load_hparams(method, model, **overrides)`` loads a method's hyperparameters.
* ``get_registry()`` lists methods and the plugins that provide them.

When ``easyeditor`` is already imported, importing this package installs the methods
(``MKE_AUTO_INSTALL=0`` turns that off).
"""

from __future__ import annotations

import os as _os
import sys as _sys
import warnings as _warnings
from typing import Any

__version__ = "0.1.0"


def install(*args: Any, **kwargs: Any):
    """Inject every registered method into EasyEdit's registries (see ``mke_plugins.easyedit``)."""
    from .easyedit import install as _install
    return _install(*args, **kwargs)


def uninstall() -> None:
    from .easyedit import uninstall as _uninstall
    _uninstall()


def load_hparams(method: str, model: str, **overrides: Any):
    from .hparams import load_hparams as _load
    return _load(method, model, **overrides)


def get_registry():
    from .registry import get_registry as _get
    return _get()


if "easyeditor" in _sys.modules and _os.environ.get("MKE_AUTO_INSTALL", "1") != "0":
    try:
        install()
    except Exception as _exc:  # noqa: BLE001 - never break an import; say what happened
        _warnings.warn(f"mke_plugins could not install its methods into EasyEdit: {_exc}. "
                       "Call mke_plugins.install() to see the full error.", stacklevel=2)
