"""Plugin objects used by the registry tests: one good, several broken in distinct ways."""

from __future__ import annotations

import types

from mke_hooks import MethodSpec, hookimpl


def _plugin(**hooks):
    return types.SimpleNamespace(**hooks)


def _spec(name, **kw):
    base = dict(name=name, hparams_cls="mke_plugins.hparams:MultimodalHyperParams",
                apply_multimodal="sample_plugins:apply", summary=f"{name} sample")
    base.update(kw)
    return MethodSpec(**base)


def apply(model, tok, requests, hparams, copy=False, return_orig_weights=False,
          keep_original_weight=False, **kwargs):
    return model, {"seen": requests}


@hookimpl
def _good(register):
    register(_spec("Good"))
    register(_spec("GoodTwo", restore="callable", trainer="sample_plugins:Trainer",
                   apply_text="sample_plugins:apply"))


class Trainer:
    pass


@hookimpl
def _raises(register):
    raise RuntimeError("boom inside plugin")


@hookimpl
def _not_a_spec(register):
    register({"name": "Dict"})


@hookimpl
def _bad_restore(register):
    register(_spec("BadRestore", restore="undo"))


@hookimpl
def _case_clash(register):
    register(_spec("good"))


@hookimpl
def _lora(register):
    register(_spec("LoRA"))


@hookimpl
def _typo(register):  # pragma: no cover - never called
    pass


@hookimpl
def _bad_refs(register):
    register(_spec("Uncallable", apply_multimodal=42))
    register(_spec("Unresolvable", apply_multimodal="no_such_module_for_mke:apply"))


@hookimpl(wrapper=True)
def _wrapping_adjust(method, model, config):  # pragma: no cover - never called
    return (yield)


def _hello(args):
    print(f"hello, {args.name}")
    return 0


@hookimpl
def _commands(subparsers):
    p = subparsers.add_parser("hello", help="say hello (sample plugin)")
    p.add_argument("--name", default="world")
    p.set_defaults(func=_hello)
    subparsers.add_parser("no-func", help="a command that forgets set_defaults(func=...)")


@hookimpl
def _taken_command(subparsers):
    subparsers.add_parser("bench", help="clashes with the built-in bench command")


@hookimpl
def _raising_commands(subparsers):
    raise RuntimeError("boom while adding commands")


#: what the sample offline stage received (``TrainArgs``, its hparams), for the CLI tests
SEEN: dict = {}


def train_flags(group):
    group.add_argument("--steps", type=int, default=3, help="sample stage steps")


def clashing_flags(group):
    group.add_argument("--out", help="clashes with the host's --out")


def train_stage(args):
    import random

    from mke_plugins.hparams import MultimodalHyperParams

    SEEN["args"] = args
    SEEN["hparams"] = args.load_hparams(MultimodalHyperParams)
    SEEN["draw"] = random.random()
    return 0


@hookimpl
def _trainy(register):
    register(_spec("Trainy", offline="sample_plugins:train_stage", offline_flags="sample_plugins:train_flags"))
    register(_spec("Clashy", offline="sample_plugins:train_stage", offline_flags="sample_plugins:clashing_flags"))
    register(_spec("Flagsonly", offline_flags="sample_plugins:train_flags"))


good = _plugin(mke_register_methods=_good)
raises = _plugin(mke_register_methods=_raises)
not_a_spec = _plugin(mke_register_methods=_not_a_spec)
bad_restore = _plugin(mke_register_methods=_bad_restore)
case_clash = _plugin(mke_register_methods=_case_clash)
lora = _plugin(mke_register_methods=_lora)
misspelled = _plugin(mke_register_method=_typo)
bad_refs = _plugin(mke_register_methods=_bad_refs)
wrapper = _plugin(mke_register_methods=_good, mke_adjust_hparams=_wrapping_adjust)
trainy = _plugin(mke_register_methods=_trainy)
commands = _plugin(mke_register_commands=_commands)
taken_command = _plugin(mke_register_commands=_taken_command)
raising_commands = _plugin(mke_register_commands=_raising_commands)
