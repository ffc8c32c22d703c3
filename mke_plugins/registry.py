"""The method registry: validated ``MethodSpec`` entries, each credited to its plugin.

Names are exact-case and unique; a name that differs from another only in case is refused.
Names that EasyEdit already uses stay usable by our bench but are flagged: the bridge never
injects over an EasyEdit built-in. References are resolved lazily, so building the registry
imports no torch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from mke_hooks import RESTORE_POLICIES, MethodSpec, RegistrationError, UnknownMethodError

from .plugins import LoadedPlugins, PluginFailure, PluginInfo, load_plugins

#: Method names EasyEdit main already uses: the keys of ``ALG_DICT``, ``ALG_MULTIMODAL_DICT``,
#: ``PER_ALG_DICT`` and ``ALG_TRAIN_DICT`` at commit 14cea82, plus its method folders' names that
#: users meet in its docs (``UnKE``, ``DeCo``), so a plugin never silently shadows them.
EASYEDIT_BUILTINS: frozenset[str] = frozenset({
    "ROME", "MEMIT", "MEMIT-FE", "FT", "DINM", "KN", "MEND", "SERAC", "SERAC_MULTI", "IKE",
    "FT-Api", "QLoRA", "LoRA", "DPO", "GRACE", "PMET", "MELO", "WISE", "R-ROME", "EMMET",
    "EAMET", "AlphaEdit", "SPHERE", "ULTRAEDIT", "CORE", "DeepEdit-Api", "SimIE", "DEFER",
    "MALMEN", "UnKE", "DeCo",
})

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]*$")


@dataclass(frozen=True)
class MethodEntry:
    spec: MethodSpec
    plugin: PluginInfo

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def shadows_easyedit(self) -> bool:
        """True when EasyEdit has its own method of this name (ours is then not injected)."""
        return self.spec.name in EASYEDIT_BUILTINS

    def hparams_dir(self) -> Path | None:
        return resolve_dir(self.spec.hparams_dir)

    def hparams_models(self) -> list[str]:
        d = self.hparams_dir()
        if d is None or not d.is_dir():
            return []
        return sorted(p.stem for p in d.iterdir() if p.suffix in (".yaml", ".yml"))


def resolve_dir(ref: str | None) -> Path | None:
    """``"package:sub/dir"`` → the folder inside the installed package; else a plain path."""
    if not ref:
        return None
    if ":" in ref and not Path(ref).is_absolute() and not re.match(r"^[A-Za-z]:[\\/]", ref):
        package, _, sub = ref.partition(":")
        return Path(str(resources.files(package))) / sub
    return Path(ref)


class Registry:
    """All methods registered by the loaded plugins."""

    def __init__(self, loaded: LoadedPlugins) -> None:
        self.loaded = loaded
        self.failures: list[PluginFailure] = list(loaded.failures)
        self._entries: dict[str, MethodEntry] = {}
        caller = loaded.manager.hook.mke_register_methods
        for impl in reversed(caller.get_hookimpls()):  # pluggy stores them last-registered-first
            info = loaded.info_of(impl.plugin)
            staged: list[MethodSpec] = []
            try:
                impl.function(register=staged.append)
                for spec in staged:
                    self._validate(spec, info)
            except RegistrationError as exc:
                self.failures.append(PluginFailure(info, str(exc), exc.fix or "fix the MethodSpec."))
                continue
            except Exception as exc:  # noqa: BLE001 - a plugin's own bug, reported by name
                self.failures.append(PluginFailure(
                    info, f"mke_register_methods raised {type(exc).__name__}: {exc}",
                    "fix the plugin, or set MKE_BLOCK_PLUGINS to skip it."))
                continue
            for spec in staged:
                self._entries[spec.name] = MethodEntry(spec, info)

    def _validate(self, spec: Any, info: PluginInfo) -> None:
        def fail(msg: str, fix: str) -> None:
            raise RegistrationError(msg, fix=fix)

        if not isinstance(spec, MethodSpec):
            fail(f"register() got {type(spec).__name__}, not a MethodSpec.",
                 "call register(mke_hooks.MethodSpec(...)).")
        if not isinstance(spec.name, str) or not _NAME_RE.match(spec.name):
            fail(f"method name {spec.name!r} is not valid.",
                 "use letters, digits, '-' or '_', starting with a letter.")
        if spec.name in self._entries:
            other = self._entries[spec.name].plugin.label
            fail(f"method {spec.name!r} is already registered by {other}.",
                 "choose another name; names are unique and exact-case.")
        for other in self._entries:
            if other.lower() == spec.name.lower():
                fail(f"method {spec.name!r} differs from {other!r} only in case.",
                     "choose a name that differs by more than case.")
        for attr in ("hparams_cls", "apply_multimodal"):
            ref = getattr(spec, attr)
            if ref is None or (isinstance(ref, str) and ":" not in ref):
                fail(f"method {spec.name!r}: {attr} must be an object or a 'module:attr' string, "
                     f"got {ref!r}.", f"set {attr}=...")
        if spec.restore not in RESTORE_POLICIES:
            fail(f"method {spec.name!r}: restore={spec.restore!r} is not a restore policy.",
                 f"use one of {list(RESTORE_POLICIES)}.")

    # -- lookup ------------------------------------------------------------------------
    def __contains__(self, name: str) -> bool:
        return name in self._entries

    def __iter__(self) -> Iterator[MethodEntry]:
        return iter(sorted(self._entries.values(), key=lambda e: e.name))

    def __len__(self) -> int:
        return len(self._entries)

    def names(self) -> list[str]:
        return sorted(self._entries)

    def get(self, name: str) -> MethodEntry:
        try:
            return self._entries[name]
        except KeyError:
            raise UnknownMethodError(name, self._entries) from None

    def plugins(self) -> list[tuple[PluginInfo, list[str]]]:
        out = []
        for info, _ in self.loaded.plugins:
            out.append((info, sorted(e.name for e in self._entries.values() if e.plugin == info)))
        return out


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (built on first use; ``reload_registry()`` rebuilds it)."""
    return Registry(load_plugins())


def reload_registry() -> Registry:
    get_registry.cache_clear()
    return get_registry()
