"""Error classes shared by the host, plugins and methods.

Every error here carries enough to act on: what broke, where (plugin, file, key, field) and
the fix. They live in the contract package so third-party plugins can raise and catch them
without importing torch or the host.
"""

from __future__ import annotations

import difflib
from typing import Iterable


class MKEError(Exception):
    """Base class of every error mke-plugins raises on purpose."""


class PluginError(MKEError):
    """A plugin failed to import, or broke a registration rule.

    ``plugin`` names the distribution and version (and entry point) so the user knows whom to
    blame; ``fix`` says what to change.
    """

    def __init__(self, message: str, *, plugin: str = "", fix: str = "") -> None:
        self.message, self.plugin, self.fix = message, plugin, fix
        text = message
        if plugin:
            text = f"plugin {plugin}: {text}"
        if fix:
            text = f"{text} Fix: {fix}"
        super().__init__(text)


class RegistrationError(PluginError):
    """A ``MethodSpec`` is invalid or clashes with another method."""


class UnknownMethodError(MKEError, KeyError):
    """A method name is not registered; the message lists the closest names."""

    def __init__(self, name: str, known: Iterable[str]) -> None:
        known = sorted(known)
        self.name = name
        self.suggestions = close_matches(name, known)
        hint = f" Did you mean: {', '.join(self.suggestions)}?" if self.suggestions else ""
        listing = ", ".join(known) if known else "(none registered)"
        self.text = (f"unknown method {name!r}.{hint} Registered methods: {listing}. "
                     "Names are case-sensitive; `mke-plugins methods` lists them.")
        super().__init__(self.text)

    def __str__(self) -> str:  # KeyError would quote the message
        return self.text


class HparamsError(MKEError, ValueError):
    """A hyperparameter file or value is wrong. Names the file, the key and the fix."""

    def __init__(self, message: str, *, path: str = "", key: str = "", fix: str = "") -> None:
        self.message, self.path, self.key, self.fix = message, path, key, fix
        where = ""
        if path:
            where = f"{path}: "
        if key:
            where += f"key {key!r}: "
        text = f"{where}{message}"
        if fix:
            text = f"{text} Fix: {fix}"
        super().__init__(text)


class RequestError(MKEError, ValueError):
    """An edit request is malformed. Names the request index and the field."""

    def __init__(self, message: str, *, field: str = "", index: int | None = None) -> None:
        self.field, self.index = field, index
        where = "request"
        if index is not None:
            where += f" #{index}"
        if field:
            where += f", field {field!r}"
        super().__init__(f"{where}: {message}")


class NonFiniteLossError(MKEError, FloatingPointError):
    """An optimisation loop met an ``inf`` / ``nan`` loss term. Names the method, the step and the term."""

    def __init__(self, method: str, step: int, term: str, value: str = "nan", *, where: str = "step",
                 fix: str = "") -> None:
        self.method, self.step, self.term, self.value, self.fix = method, step, term, value, fix
        text = f"{method}: the loss term {term!r} is not finite at {where} {step} (it is {value})."
        if fix:
            text = f"{text} Fix: {fix}"
        super().__init__(text)


class ArchiveError(MKEError, FileNotFoundError):
    """An offline artefact (trained archive, on-disk cache) is missing, damaged or for another model.

    Damaged covers a truncated file, a missing key, a tensor of the wrong shape and a NaN or inf
    value. The message names the file (and the tensor) and the fix: the exact command that
    rebuilds an archive, or deleting a cache so it is rebuilt.
    """


#: Pairs of distinct methods whose names look alike. A suggestion never maps one to the other
#: (EasyEdit ships the text method ``UnKE`` and ``DeCo``; ours are ``UniKE`` and ``DECODE``).
NEVER_SUGGEST: frozenset[frozenset[str]] = frozenset({
    frozenset({"unke", "unike"}),
    frozenset({"deco", "decode"}),
})


def close_matches(name: str, candidates: Iterable[str], n: int = 3) -> list[str]:
    """Closest candidate names: case-insensitive similarity, but results keep their exact case."""
    lowered = {c.lower(): c for c in candidates}
    hits = difflib.get_close_matches(name.lower(), list(lowered), n=n, cutoff=0.5)
    return [lowered[h] for h in hits
            if h == name.lower() or frozenset({name.lower(), h}) not in NEVER_SUGGEST]
