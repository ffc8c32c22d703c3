"""The plugin manager: built-in plugins plus third-party ones from the ``mke_plugins`` entry points.

A plugin that fails to import, implements a misspelled hook or registers badly is recorded as a
:class:`PluginFailure` (who, what, the fix) and skipped; the other plugins still load. Two
environment variables select plugins: ``MKE_LOAD_PLUGINS`` (comma-separated distribution or
entry-point names: load only these third-party plugins) and ``MKE_BLOCK_PLUGINS`` (skip these).
"""

from __future__ import annotations

import importlib
import os
import warnings
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any

import pluggy

from mke_hooks import PROJECT, close_matches, hookspecs

ENTRY_POINT_GROUP = "mke_plugins"

#: Built-in plugins: modules implementing ``mke_register_methods``. A method is listed here only
#: once it works end to end (no method is registered before it is complete).
DEFAULT_PLUGINS: tuple[str, ...] = (
    "mke_plugins.methods.baselines",
    "mke_plugins.methods.asam",
    "mke_plugins.methods.decode",
    "mke_plugins.methods.unike",
    "mke_plugins.methods.ldke",
)

HOOK_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("mke_"))


@dataclass(frozen=True)
class PluginInfo:
    """Who provides a plugin: its pluggy name, distribution, version and entry point."""

    name: str
    distribution: str
    version: str
    entry_point: str = ""
    builtin: bool = False

    @property
    def label(self) -> str:
        where = f" (entry point {self.entry_point})" if self.entry_point else ""
        return f"{self.distribution} {self.version}{where}"


@dataclass(frozen=True)
class PluginFailure:
    plugin: PluginInfo
    error: str
    fix: str

    def __str__(self) -> str:
        return f"plugin {self.plugin.label}: {self.error} Fix: {self.fix}"


@dataclass
class LoadedPlugins:
    manager: pluggy.PluginManager
    plugins: list[tuple[PluginInfo, Any]] = field(default_factory=list)
    failures: list[PluginFailure] = field(default_factory=list)

    def info_of(self, plugin_obj: Any) -> PluginInfo:
        for info, obj in self.plugins:
            if obj is plugin_obj:
                return info
        raise KeyError(plugin_obj)


def _env_names(var: str) -> set[str] | None:
    raw = os.environ.get(var, "").strip()
    if not raw:
        return None
    return {n.strip() for n in raw.split(",") if n.strip()}


def _selected(info: PluginInfo) -> bool:
    load, block = _env_names("MKE_LOAD_PLUGINS"), _env_names("MKE_BLOCK_PLUGINS")
    keys = _keys(info)
    if block and keys & block:
        return False
    if load is not None and not info.builtin and not keys & load:
        return False
    return True


def _misspelled_hooks(obj: Any) -> list[tuple[str, list[str]]]:
    """Attributes that look like hook implementations but name no hookspec."""
    marker = f"{PROJECT}_impl"
    bad = []
    for attr in dir(obj):
        value = getattr(obj, attr, None)
        if attr.startswith("mke_") or hasattr(value, marker):
            if attr not in HOOK_NAMES and callable(value):
                bad.append((attr, close_matches(attr, HOOK_NAMES, n=1)))
    return bad


def _add(loaded: LoadedPlugins, info: PluginInfo, load: Any) -> None:
    """Import one plugin and register it, or record why not."""
    if not _selected(info):
        return
    try:
        obj = load()
    except Exception as exc:  # noqa: BLE001 - any import failure is the plugin's, reported
        loaded.failures.append(PluginFailure(info, f"failed to import: {type(exc).__name__}: {exc}",
                                             "install the plugin's missing dependencies or fix "
                                             "its entry point; set MKE_BLOCK_PLUGINS to skip it."))
        return
    bad = _misspelled_hooks(obj)
    if bad:
        name, sugg = bad[0]
        hint = f" (did you mean {sugg[0]!r}?)" if sugg else ""
        loaded.failures.append(PluginFailure(info, f"implements unknown hook {name!r}{hint}.",
                                             f"rename it to one of {list(HOOK_NAMES)}."))
        return
    try:
        loaded.manager.register(obj, name=info.name)
    except Exception as exc:  # noqa: BLE001 - pluggy's validation errors
        loaded.failures.append(PluginFailure(info, f"rejected by the plugin manager: {exc}",
                                             "match the hook signatures in hooks/README.md."))
        return
    wrappers = _wrapper_hooks(loaded.manager, obj)
    if wrappers:
        loaded.manager.unregister(obj)
        loaded.failures.append(PluginFailure(info, f"implements {wrappers[0]!r} as a hook wrapper.",
                                             "drop wrapper=/hookwrapper= from its @hookimpl; "
                                             "mke_plugins calls each plugin's hooks one at a time."))
        return
    loaded.plugins.append((info, obj))


def _wrapper_hooks(pm: pluggy.PluginManager, obj: Any) -> list[str]:
    """Hooks that ``obj`` implements as wrappers (the host calls plain implementations only)."""
    return [caller.name for caller in pm.get_hookcallers(obj) or []
            for impl in caller.get_hookimpls()
            if impl.plugin is obj and (impl.hookwrapper or impl.wrapper)]


def load_plugins(*, entry_points: bool = True) -> LoadedPlugins:
    """Build a plugin manager with the built-ins and, unless disabled, the installed plugins."""
    pm = pluggy.PluginManager(PROJECT)
    pm.add_hookspecs(hookspecs)
    loaded = LoadedPlugins(pm)
    own = metadata.version("mke-plugins") if _installed("mke-plugins") else "dev"
    candidates: list[PluginInfo] = []
    for module in DEFAULT_PLUGINS:
        info = PluginInfo(module, "mke-plugins", own, builtin=True)
        candidates.append(info)
        _add(loaded, info, lambda m=module: importlib.import_module(m))
    if entry_points:
        for ep in sorted(metadata.entry_points(group=ENTRY_POINT_GROUP), key=lambda e: e.name):
            dist = ep.dist.name if ep.dist is not None else "unknown"
            version = ep.dist.version if ep.dist is not None else "?"
            info = PluginInfo(ep.name, dist, version, entry_point=f"{ep.name} = {ep.value}")
            candidates.append(info)
            if any(i.name == info.name for i, _ in loaded.plugins):
                loaded.failures.append(PluginFailure(info, f"plugin name {ep.name!r} is already taken.",
                                                     "rename the entry point."))
                continue
            _add(loaded, info, ep.load)
    pm.check_pending()
    if entry_points:
        _warn_unmatched_env(candidates)
    return loaded


def _keys(info: PluginInfo) -> set[str]:
    """The names ``MKE_LOAD_PLUGINS`` / ``MKE_BLOCK_PLUGINS`` match a plugin by."""
    return {info.distribution, info.name, info.entry_point.split("=")[0].strip()} - {""}


def _warn_unmatched_env(candidates: list[PluginInfo]) -> None:
    """Warn about each name in the selection variables that matches no installed plugin."""
    known = sorted(set().union(*map(_keys, candidates)))
    for var in ("MKE_LOAD_PLUGINS", "MKE_BLOCK_PLUGINS"):
        for name in sorted((_env_names(var) or set()) - set(known)):
            sugg = close_matches(name, known)
            hint = f" Did you mean {', '.join(map(repr, sugg))}?" if sugg else ""
            warnings.warn(f"{var} names {name!r}, which matches no installed plugin.{hint} "
                          f"Available plugin names: {', '.join(known)}.", stacklevel=3)


def _installed(dist: str) -> bool:
    try:
        metadata.version(dist)
        return True
    except metadata.PackageNotFoundError:
        return False
