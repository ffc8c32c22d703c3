"""Files shipped inside installed packages, named in hyperparameters by one prefix syntax.

A string value ``"@<key>"`` or ``"@<key>/<relative path>"`` names the folder registered under
``<key>`` (or a file below it) and is replaced by its absolute path when hyperparameters are
built, so a bundled YAML works from any install location::

    model_name: "@world-model"                # the bundled world model's folder
    coco_image: "@world-data"                 # the world's data folder (built on first use)
    classifier_archive: "@ldke/world.pt"      # a file in LDKE's archives folder

Packages contribute keys with :func:`register_bundled`, usually when their plugin module is
imported; a root may be a ``"module:function"`` reference, so contributing a key imports
nothing. The host knows no key itself: a key it has not seen makes it load the plugins once
(their modules register their keys), and a value whose key is still unknown is left as written.
Old spellings registered with ``old=`` keep working with a ``DeprecationWarning`` naming the
new one.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Union

from mke_hooks import HparamsError, resolve

#: A zero-argument function returning the folder, or a ``"module:function"`` reference to one.
Root = Union[Callable[[], Union[str, Path]], str]

#: ``key`` -> root of every registered prefix.
BUNDLED_ROOTS: dict[str, Root] = {}
#: Deprecated key -> the key that replaces it (``"world"`` -> ``"world-model"``).
BUNDLED_ALIASES: dict[str, str] = {}

_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]*$")
_discovered = False


def _ref_name(root: Root) -> str:
    """A root as a ``module:qualname`` string (a reference is its own name)."""
    if isinstance(root, str):
        return root
    return f"{getattr(root, '__module__', '?')}:{getattr(root, '__qualname__', repr(root))}"


def _same_root(a: Root, b: Root) -> bool:
    """The same function, or a reference and the function it names."""
    if isinstance(a, str) or isinstance(b, str):
        return _ref_name(a) == _ref_name(b)
    return a is b


def register_bundled(key: str, root: Root, *, old: str | Iterable[str] = ()) -> None:
    """Make ``"@<key>/<path>"`` resolve below ``root()``; ``old`` keys are deprecated spellings of it.

    Registering the same root again is a no-op; another root under a taken key is refused.
    """
    if not isinstance(key, str) or not _KEY.match(key):
        raise ValueError(f"bundled key {key!r} must start with a letter and use letters, digits, '.', '_' or '-'")
    if not (callable(root) or (isinstance(root, str) and ":" in root)):
        raise ValueError(f"root of '@{key}' must be a function or a 'module:function' reference, got {root!r}")
    taken = BUNDLED_ROOTS.get(key)
    if taken is not None and not _same_root(taken, root):
        raise ValueError(f"bundled key '@{key}' is already registered to {_ref_name(taken)}; choose another key")
    BUNDLED_ROOTS[key] = root if taken is None or callable(root) else taken
    for name in [old] if isinstance(old, str) else old:
        BUNDLED_ALIASES[name] = key


def bundled_keys() -> list[str]:
    """The registered keys (``@<key>``), after loading the plugins that contribute them."""
    _discover()
    return sorted(BUNDLED_ROOTS)


def _discover() -> None:
    """Import every plugin once, so that their modules register their keys."""
    global _discovered
    if not _discovered:
        _discovered = True
        from .plugins import load_plugins

        load_plugins()


def resolve_bundled(value: Any, *, path: str = "", key: str = "") -> Any:
    """``"@<key>/<rel>"`` -> absolute path string; unregistered keys and non-strings are returned as is."""
    if not isinstance(value, str) or not value.startswith("@"):
        return value
    name, sep, rel = value[1:].partition("/")
    if name not in BUNDLED_ROOTS and name not in BUNDLED_ALIASES:
        _discover()
    if name in BUNDLED_ALIASES:
        name = BUNDLED_ALIASES[name]
        new = f"@{name}{sep}{rel}"
        where = f"{path}: " if path else ""
        where += f"key {key!r}: " if key else ""
        warnings.warn(f"{where}{value!r} is a deprecated spelling; write {new!r} (the "
                      "'@<key>/<relative path>' syntax).", DeprecationWarning, stacklevel=3)
    if name not in BUNDLED_ROOTS:
        return value
    root = Path(_root_folder(name, value, path=path, key=key))
    return str(root / rel) if rel else str(root)


def _root_folder(name: str, value: str, *, path: str, key: str) -> str | Path:
    try:
        root = resolve(BUNDLED_ROOTS[name])
        return root() if callable(root) else root
    except Exception as exc:  # noqa: BLE001 - a contributor's broken reference, reported by key
        raise HparamsError(f"{value!r}: the folder of '@{name}' cannot be found "
                           f"({_ref_name(BUNDLED_ROOTS[name])}: {type(exc).__name__}: {exc}).", path=path,
                           key=key, fix="install the package that provides it, or write a plain path.") from exc
