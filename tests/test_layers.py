"""The package's layers only import downwards.

Order, bottom to top: contract (``hooks/mke_hooks``) → host (plugin manager, registry, hparams)
→ bridge (EasyEdit) → adapters → core → methods → world → bench → testing → cli. A module may
import its own layer and the layers below it, never one above: a method that imports the world
or the testing kit cannot run on a user's own model and data, and a lower layer that imports a
higher one drags it (and its dependencies) into everything. Every ``import`` / ``from`` in every
module counts, including relative ones and those inside functions. Methods also never import the
EasyEdit bridge: the host and the bench decide how a method reaches EasyEdit.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

LAYERS: tuple[str, ...] = ("contract", "host", "bridge", "adapters", "core", "methods", "world", "bench", "testing",
                           "cli")
#: modules of a layer that are not a subpackage named after it
MODULE_LAYERS: dict[str, str] = {
    "mke_plugins.plugins": "host", "mke_plugins.registry": "host", "mke_plugins.hparams": "host",
    "mke_plugins.trainer_hparams": "host", "mke_plugins.bundled": "host",
    "mke_plugins.author": "methods",  # re-exports host, adapters and core for plugin authors
    "mke_plugins.easyedit": "bridge", "mke_plugins.autoinstall": "bridge",
    "mke_plugins": "cli", "mke_plugins.__main__": "cli", "mke_plugins.cli": "cli", "mke_plugins.train": "cli",
}
PACKAGE_LAYERS = ("adapters", "core", "methods", "world", "bench", "testing")
#: (importer, imported) edges that reach up today, each with the reason it is still there
EXEMPT: dict[tuple[str, str], str] = {
    # TODO(autoinstall): building an hparams object installs our methods into an already imported
    # EasyEdit (maybe_install); the bridge could register that callback with the host instead.
    ("mke_plugins.hparams", "mke_plugins.autoinstall"): "auto-install when hparams are built",
    # TODO(bridge-guard): the EasyEdit-facing apply wrapper (make_apply) checks tokens and runs the
    # core's EditGuard; moving make_apply into core (install() taking the wrapped applies) drops these.
    ("mke_plugins.easyedit", "mke_plugins.core.requests"): "make_apply's token check",
    ("mke_plugins.easyedit", "mke_plugins.core.guard"): "make_apply's EditGuard",
    # TODO(scale-tiny): scale builds its random-init model around the testing kit's tiny tokenizer
    # and Qwen config builders; moving those builders out of testing/ drops this edge.
    ("mke_plugins.bench.scale", "mke_plugins.testing.tiny"): "tiny tokenizer and config builders",
}
#: (importer layer, imported module prefix) pairs refused although the imported layer is lower
FORBIDDEN: tuple[tuple[str, str], ...] = (("methods", "mke_plugins.easyedit"), ("methods", "mke_plugins.autoinstall"))


def module_files() -> dict[str, Path]:
    """Dotted module name -> file, for ``mke_plugins`` and ``mke_hooks``."""
    out = {}
    for base, root in (("mke_plugins", ROOT / "mke_plugins"), ("mke_hooks", ROOT / "hooks" / "mke_hooks")):
        for path in root.rglob("*.py"):
            parts = [base, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts = parts[:-1]
            out[".".join(parts)] = path
    return out


def layer_of(module: str) -> str | None:
    if module == "mke_hooks" or module.startswith("mke_hooks."):
        return "contract"
    if module in MODULE_LAYERS:
        return MODULE_LAYERS[module]
    for package in PACKAGE_LAYERS:
        if module == f"mke_plugins.{package}" or module.startswith(f"mke_plugins.{package}."):
            return package
    return None


def imported_modules(module: str, path: Path, known: set[str]) -> list[tuple[str, int]]:
    """``(imported module, line)`` of every import in ``path``; ``from a import b`` is ``a.b`` when that is a module."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                base = ".".join(parts + ([node.module] if node.module else []))
            for alias in node.names:
                full = f"{base}.{alias.name}"
                found.append((full if full in known else base, node.lineno))
    return [(m, line) for m, line in found if m.split(".")[0] in ("mke_plugins", "mke_hooks")]


def edges() -> list[tuple[str, str, int, Path]]:
    files = module_files()
    return [(module, target, line, path) for module, path in sorted(files.items())
            for target, line in imported_modules(module, path, set(files))]


def test_every_module_has_a_layer():
    unclassified = sorted({m for m, t, _, _ in edges() for m in (m, t) if layer_of(m) is None})
    assert not unclassified, f"add these modules to a layer in tests/test_layers.py: {unclassified}"


def test_no_layer_imports_a_layer_above_it():
    bad = []
    for module, target, line, path in edges():
        low, high = layer_of(module), layer_of(target)
        if low is None or high is None or LAYERS.index(high) <= LAYERS.index(low):
            continue
        if (module, target) not in EXEMPT:
            bad.append(f"{path.relative_to(ROOT)}:{line}: {module} ({low}) imports {target} ({high})")
    assert not bad, "imports that reach up a layer:\n" + "\n".join(bad)


def test_exemptions_are_still_needed():
    present = {(module, target) for module, target, _, _ in edges()}
    stale = sorted(set(EXEMPT) - present)
    assert not stale, f"these edges are gone; drop them from EXEMPT in tests/test_layers.py: {stale}"


def test_methods_never_import_the_easyedit_bridge():
    bad = [f"{path.relative_to(ROOT)}:{line}: {module} imports {target}" for module, target, line, path in edges()
           for layer, prefix in FORBIDDEN if layer_of(module) == layer and target.startswith(prefix)]
    assert not bad, "methods reach EasyEdit through the host and the bench, not the bridge:\n" + "\n".join(bad)


def test_the_walker_sees_relative_and_function_level_imports(tmp_path):
    src = tmp_path / "m.py"
    src.write_text("from . import world\n\ndef f():\n    from ..testing.tiny import build_tiny\n    import mke_hooks\n")
    known = {"mke_plugins.methods.world", "mke_plugins.testing.tiny"}
    got = imported_modules("mke_plugins.methods.x", src, known)
    assert got == [("mke_plugins.methods.world", 1), ("mke_plugins.testing.tiny", 4), ("mke_hooks", 5)]


def test_the_example_plugin_builds_only_on_the_author_surface():
    """examples/mke-hello imports mke-plugins only through ``mke_plugins.author`` (its package
    ``__init__`` only the contract ``mke_hooks``; its tests the conformance kit)."""
    root = ROOT / "examples" / "mke-hello"
    allowed = {"mke_hello": ("mke_hooks",), "tests": ("mke_plugins.testing",)}
    bad = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if rel.parts[0] not in allowed:
            continue
        ok = ("mke_hooks",) if path.name == "__init__.py" else ("mke_plugins.author",) + allowed[rel.parts[0]]
        for target, line in imported_modules("mke_hello.x", path, set()):
            if not any(target == p or target.startswith(p + ".") for p in ok):
                bad.append(f"{rel}:{line}: imports {target} (allowed: {', '.join(ok)})")
    assert not bad, "\n".join(bad)


def test_the_author_surface_exports_what_it_lists():
    import mke_plugins.author as author

    missing = [name for name in author.__all__ if not hasattr(author, name)]
    assert not missing and len(author.__all__) == len(set(author.__all__))
