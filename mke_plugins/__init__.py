"""mke-plugins: multimodal knowledge-editing methods for EasyEdit, delivered as pluggy plugins.

Importing this package is cheap (no torch): the public functions import what they need.

* ``install()`` / ``uninstall()`` put every registered method into EasyEdit's registries.
* ``load_hparams(method, model, **overrides)`` loads a method's hyperparameters.
* ``get_registry()`` lists methods and the plugins that provide them.

The methods are installed into EasyEdit automatically, whatever the import order: at
``import mke_plugins`` when ``easyeditor`` is already imported, else right after ``easyeditor``
is imported (``mke_plugins.autoinstall``; ``MKE_AUTO_INSTALL=0`` turns that off).
"""

from __future__ import annotations

from typing import Any

from . import autoinstall as _autoinstall

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


_autoinstall.activate()
