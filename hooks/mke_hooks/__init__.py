"""The plugin contract of mke-plugins: hookspecs, ``hookimpl``, ``MethodSpec``, ``TrainArgs`` and errors.

This package depends on pluggy only. It imports no torch, transformers, easyeditor or
mke_plugins, so a third-party plugin can declare its methods cheaply.
"""

from .errors import (
    ArchiveError,
    HparamsError,
    MKEError,
    NonFiniteLossError,
    PluginError,
    RegistrationError,
    RequestError,
    UnknownMethodError,
    close_matches,
)
from .hookspecs import PROJECT, hookimpl, hookspec
from .spec import RESTORE_POLICIES, MethodSpec, resolve
from .train import TrainArgs

__all__ = [
    "PROJECT", "hookimpl", "hookspec", "MethodSpec", "RESTORE_POLICIES", "resolve", "TrainArgs",
    "MKEError", "PluginError", "RegistrationError", "UnknownMethodError", "HparamsError",
    "RequestError", "ArchiveError", "NonFiniteLossError", "close_matches",
]
