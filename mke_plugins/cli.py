"""The ``mke-plugins`` command.

``plugins`` / ``methods`` / ``hparams`` are answered from the registry without importing torch.
Subcommand groups that need models (``world``, ``bench``, ``scale``, ``train``) live beside their
code and add themselves through an ``add_parser(subparsers)`` function listed in
``COMMAND_MODULES``; ``train METHOD`` (``mke_plugins/train.py``) runs the offline stage a method
declares in its ``MethodSpec.offline``. Plugins add commands of their own through the
``mke_register_commands`` hook; a name already taken is refused, naming the plugin.

An error mke-plugins raises on purpose (``MKEError``) is one line on stderr and exit code 2;
``-v`` before the command (or ``bench -v``) adds its traceback. Every command may be piped into
``head``: a closed pipe ends it quietly.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import os
import sys
import traceback
from typing import Any, Sequence

from mke_hooks import MKEError, PluginError

COMMAND_MODULES: tuple[str, ...] = ("mke_plugins.train", "mke_plugins.world.cli", "mke_plugins.bench.cli",
                                    "mke_plugins.bench.scale")


def _registry():
    from .registry import get_registry
    return get_registry()


def cmd_plugins(args: argparse.Namespace) -> int:
    reg = _registry()
    rows = [{"name": info.name, "distribution": info.distribution, "version": info.version,
             "entry_point": info.entry_point, "builtin": info.builtin, "methods": methods}
            for info, methods in reg.plugins()]
    failures = [{"plugin": f.plugin.label, "error": f.error, "fix": f.fix} for f in reg.failures]
    if args.json:
        print(json.dumps({"plugins": rows, "failures": failures}, indent=2))
        return 0
    for r in rows:
        kind = "built-in" if r["builtin"] else r["entry_point"]
        print(f"{r['name']}  [{r['distribution']} {r['version']}; {kind}]: "
              f"{', '.join(r['methods']) or '(no methods)'}")
    for f in reg.failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 0


def cmd_methods(args: argparse.Namespace) -> int:
    reg = _registry()
    rows = []
    for e in reg:
        rows.append({"name": e.name, "plugin": e.plugin.name, "distribution": e.plugin.distribution,
                     "version": e.plugin.version, "summary": e.spec.summary, "paper": e.spec.paper,
                     "hparams_models": e.hparams_models(), "trainable": e.spec.trainer is not None,
                     "restore": e.spec.restore,
                     "easyedit": ("not injected: EasyEdit has its own method of this name"
                                  if e.shadows_easyedit else "injected by mke_plugins.install()")})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    if not rows:
        print("no methods registered")
    for r in rows:
        note = "" if r["easyedit"].startswith("injected") else f"  ({r['easyedit']})"
        print(f"{r['name']:<8} {r['plugin']:<28} {r['summary']}{note}")
        print(f"{'':<8} hparams: {', '.join(r['hparams_models']) or '-'}")
    for f in reg.failures:
        print(f"FAILED {f}", file=sys.stderr)
    return 0


def cmd_hparams(args: argparse.Namespace) -> int:
    import yaml

    from .hparams import load_hparams, locate_hparams

    hparams = load_hparams(args.method, args.model)
    path = locate_hparams(args.method, args.model) if not args.model.endswith((".yaml", ".yml")) else args.model
    print(f"# {args.method} on {args.model}: {path}")
    helps = type(hparams).field_help()
    for key, value in hparams.to_dict().items():
        if args.verbose:
            print(f"# {helps.get(key, '')}")
        print(yaml.safe_dump({key: value}, default_flow_style=True, sort_keys=False).strip().strip("{}"))
    return 0


class CommandAdder:
    """What a plugin's ``mke_register_commands`` gets: ``add_parser`` that refuses a name already taken."""

    def __init__(self, subparsers: Any, plugin: str) -> None:
        self._sub, self.plugin = subparsers, plugin
        self.added: list[tuple[str, argparse.ArgumentParser]] = []

    def add_parser(self, name: str, **kwargs: Any) -> argparse.ArgumentParser:
        for taken in (name, *kwargs.get("aliases", ())):
            if taken in self._sub.choices:
                raise PluginError(f"command {taken!r} is already taken (a built-in command or another plugin's).",
                                  plugin=self.plugin, fix="give the command another name.")
        parser = self._sub.add_parser(name, **kwargs)
        self.added.append((name, parser))
        return parser


def _command_without_func(name: str, plugin: str) -> Any:
    def run(args: argparse.Namespace) -> int:
        raise PluginError(f"command {name!r} sets no func.", plugin=plugin,
                          fix="call set_defaults(func=run) on the parser it adds, run(args) returning the exit code.")
    return run


def add_plugin_commands(sub: Any) -> None:
    """Call each plugin's ``mke_register_commands``; a plugin that fails is reported and skipped."""
    from .plugins import PluginFailure
    from .registry import registration_order

    reg = _registry()
    impls = {id(i.plugin): i.function for i in reg.loaded.manager.hook.mke_register_commands.get_hookimpls()}
    for info, obj in registration_order(reg.loaded):
        if id(obj) not in impls:
            continue
        adder = CommandAdder(sub, info.label)
        try:
            impls[id(obj)](subparsers=adder)
        except Exception as exc:  # noqa: BLE001 - a plugin's own bug, reported by name
            failure = PluginFailure(info, f"mke_register_commands raised {type(exc).__name__}: "
                                          f"{getattr(exc, 'message', exc)}",
                                    getattr(exc, "fix", "") or "fix the plugin, or set MKE_BLOCK_PLUGINS to skip it.")
            if failure not in reg.failures:
                reg.failures.append(failure)
            print(f"mke-plugins: warning: {failure}", file=sys.stderr)
        for name, parser in adder.added:
            if parser.get_default("func") is None:
                parser.set_defaults(func=_command_without_func(name, info.label))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="mke-plugins", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", dest="traceback", action="store_true",
                        help="on an error, show the traceback too")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list plugins, their versions and methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("methods", help="list registered methods")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_methods)
    p = sub.add_parser("hparams", help="print a method's resolved hyperparameters for a model")
    p.add_argument("method")
    p.add_argument("model", help="bundled model key (e.g. world) or a YAML path")
    p.add_argument("-v", "--verbose", action="store_true", help="show each field's help")
    p.set_defaults(func=cmd_hparams)
    for module in COMMAND_MODULES:
        if importlib.util.find_spec(module) is not None:
            importlib.import_module(module).add_parser(sub)
    add_plugin_commands(sub)
    return parser


def _run(parser: argparse.ArgumentParser, args: argparse.Namespace, rest: list[str]) -> int:
    if getattr(args, "passthrough", False):
        return int(args.func(args, rest) or 0)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    return int(args.func(args) or 0)


def _quiet_stdout() -> None:
    """After a closed pipe: send what is left for stdout to devnull, so exiting prints nothing."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):  # stdout is not a file (a test's capture)
        pass


def main(argv: Sequence[str] | None = None) -> int:
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args, rest = parser.parse_known_args(argv)
        code = _run(parser, args, rest)
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return code
    except BrokenPipeError:  # `mke-plugins ... | head -1`
        _quiet_stdout()
        return 1
    except MKEError as exc:
        if getattr(args, "traceback", False):
            traceback.print_exc()
        print(f"mke-plugins: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
