"""The method registry: validated ``MethodSpec`` entries, each credited to its plugin.

Names are exact-case and unique; a name that differs from another only in case is refused.
Built-in plugins register first, so a third-party plugin can never take a built-in's name: the
clashing spec is refused and credited to the newcomer, and every other method stays registered.
Names that EasyEdit already uses stay usable by our bench but are flagged: the bridge never
injects over an EasyEdit built-in. References are resolved lazily, so building the registry
imports no torch.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass, replace
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any, Iterator

from mke_hooks import RESTORE_POLICIES, MethodSpec, PluginError, RegistrationError, UnknownMethodError

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

#: ``MethodSpec`` fields that name code: a callable (or class) or a ``"module:attr"`` string.
REFERENCE_FIELDS: tuple[str, ...] = ("hparams_cls", "apply_multimodal", "apply_text", "trainer", "offline",
                                     "offline_flags")
REQUIRED_REFERENCES: frozenset[str] = frozenset({"hparams_cls", "apply_multimodal"})


def _reference_problem(ref: Any, *, required: bool) -> str:
    """Why ``ref`` cannot name code (``""`` when it can)."""
    if ref is None:
        return "is required" if required else ""
    if isinstance(ref, str):
        module, sep, attr = ref.partition(":")
        return "" if sep and module and attr else "must look like 'package.module:attribute'"
    return "" if callable(ref) else "must be callable (a function or class) or a 'module:attr' string"


def registration_order(loaded: LoadedPlugins) -> list[tuple[PluginInfo, Any]]:
    """Built-in plugins first, then third-party ones, each group in load order."""
    return sorted(loaded.plugins, key=lambda pair: not pair[0].builtin)


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
    """All methods registered by the loaded plugins.

    Built-in plugins register first, then third-party plugins in load order (entry-point name),
    whatever order pluggy keeps its hook implementations in. A spec that is invalid or takes a
    name already registered is refused alone and credited to the plugin that registered it; the
    plugin's other methods stay registered.
    """

    def __init__(self, loaded: LoadedPlugins) -> None:
        self.loaded = loaded
        self.failures: list[PluginFailure] = list(loaded.failures)
        self._entries: dict[str, MethodEntry] = {}
        impls = {id(impl.plugin): impl for impl in loaded.manager.hook.mke_register_methods.get_hookimpls()}
        for info, obj in registration_order(loaded):
            if id(obj) in impls:
                self._register_plugin(info, impls[id(obj)].function)

    def _register_plugin(self, info: PluginInfo, hook: Any) -> None:
        """Call one plugin's ``mke_register_methods``, then register its valid specs one by one."""
        staged: list[Any] = []
        try:
            hook(register=staged.append)
        except Exception as exc:  # noqa: BLE001 - a plugin's own bug, reported by name
            self.failures.append(PluginFailure(
                info, f"mke_register_methods raised {type(exc).__name__}: {exc}",
                "fix the plugin, or set MKE_BLOCK_PLUGINS to skip it."))
            return
        for spec in staged:
            try:
                self._validate(spec, info)
            except RegistrationError as exc:
                self.failures.append(PluginFailure(info, exc.message, exc.fix or "fix the MethodSpec."))
                continue
            self._entries[spec.name] = MethodEntry(replace(spec, registered_by=info.label), info)

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
            owner = self._entries[spec.name].plugin
            by = f"the built-in plugin of {owner.label}" if owner.builtin else owner.label
            fail(f"method {spec.name!r} is already registered by {by}; this registration is refused.",
                 f"rename the method in {info.distribution}'s MethodSpec (names are unique and "
                 f"exact-case), or set MKE_BLOCK_PLUGINS={info.name} to skip this plugin.")
        for other in self._entries:
            if other.lower() == spec.name.lower():
                fail(f"method {spec.name!r} differs from {other!r} only in case.",
                     "choose a name that differs by more than case.")
        for attr in REFERENCE_FIELDS:
            problem = _reference_problem(getattr(spec, attr), required=attr in REQUIRED_REFERENCES)
            if problem:
                fail(f"method {spec.name!r}: {attr} {problem}, got {getattr(spec, attr)!r}.",
                     f"set {attr}= to a callable or a 'package.module:attribute' string.")
        if spec.offline_flags is not None and spec.offline is None:
            fail(f"method {spec.name!r}: offline_flags is set but offline is not.",
                 "set offline= to the stage's run(args) function, or drop offline_flags.")
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

    # -- per-method hooks --------------------------------------------------------------
    def call_hook(self, hook: str, *, method: str, first: bool = False, **kwargs: Any) -> list[Any]:
        """Call every plugin's ``hook(method=..., **kwargs)`` one at a time, in pluggy's order.

        Returns the non-``None`` answers (only the first when ``first``). An implementation that
        raises is reported by its plugin: when that plugin registered ``method`` the call fails
        with a ``PluginError``; otherwise the answer is skipped with a warning (and recorded in
        ``failures``), so one broken plugin never breaks another plugin's method.
        """
        owner = self.get(method).plugin
        kwargs["method"] = method
        answers: list[Any] = []
        for impl in reversed(getattr(self.loaded.manager.hook, hook).get_hookimpls()):
            try:
                answer = impl.function(*(kwargs[a] for a in impl.argnames))
            except Exception as exc:  # noqa: BLE001 - a plugin's own bug, reported by name
                self._hook_failed(impl.plugin, hook, kwargs, exc, owner)
                continue
            if answer is not None:
                answers.append(answer)
                if first:
                    break
        return answers

    def _hook_failed(self, plugin: Any, hook: str, kwargs: dict[str, Any], exc: Exception,
                     owner: PluginInfo) -> None:
        info = self.loaded.info_of(plugin)
        failure = PluginFailure(
            info, f"{hook}({kwargs['method']!r}, {kwargs.get('model')!r}) raised "
                  f"{type(exc).__name__}: {exc}",
            f"fix the plugin, or set MKE_BLOCK_PLUGINS={info.name} to skip it.")
        if info == owner:
            raise PluginError(failure.error, plugin=info.label, fix=failure.fix) from exc
        if failure not in self.failures:
            self.failures.append(failure)
        warnings.warn(f"{failure} Its {hook} answer was skipped.", stacklevel=4)


@lru_cache(maxsize=1)
def get_registry() -> Registry:
    """The process-wide registry (built on first use; ``reload_registry()`` rebuilds it)."""
    return Registry(load_plugins())


def reload_registry() -> Registry:
    get_registry.cache_clear()
    return get_registry()
