"""The hooks a plugin may implement. Project name and prefix: ``mke_plugins`` / ``mke_``.

Plugins decorate functions with ``mke_hooks.hookimpl``. Every hook is documented in
``hooks/README.md`` with its exact signature and a runnable example; a test keeps the two in
step.
"""

from __future__ import annotations

from typing import Any, Callable

import pluggy

PROJECT = "mke_plugins"
hookspec = pluggy.HookspecMarker(PROJECT)
hookimpl = pluggy.HookimplMarker(PROJECT)


@hookspec
def mke_register_methods(register: Callable[[Any], None]) -> None:
    """Call ``register(MethodSpec(...))`` once per method the plugin provides."""


@hookspec(firstresult=True)
def mke_locate_hparams(method: str, model: str) -> str | None:
    """Return the path of the YAML to use for ``method`` on ``model``, or ``None`` to pass.

    The first non-``None`` answer wins; if every plugin passes, the method's bundled
    ``hparams/<model>.yaml`` is used.
    """


@hookspec
def mke_adjust_hparams(method: str, model: str, config: dict[str, Any]) -> None:
    """Edit the loaded YAML mapping ``config`` in place before it is validated."""


@hookspec
def mke_register_commands(subparsers: Any) -> None:
    """Add commands to ``mke-plugins``: ``subparsers.add_parser(name, help=...)`` per command.

    Give each command ``set_defaults(func=run)``, where ``run(args: argparse.Namespace) -> int``
    returns the exit code. A name already taken (a built-in command or another plugin's) is
    refused, naming the plugin.
    """
