"""Hyperparameters: an EasyEdit-compatible dataclass base with strict YAML loading.

EasyEdit only reads attributes off its hparams objects (``alg_name``, ``model_name``,
``device``, ``dtype``, ...) and builds them with ``Cls.from_hparams(path)``. This base keeps
that contract and works without EasyEdit installed, but is strict where EasyEdit is lax:
unknown keys are rejected with close-match suggestions, all missing keys are listed at once,
and every message names the file and the key.

A field is declared with ``hp(default, "help", ge=, gt=, le=, lt=, finite=, nonempty=,
distinct=)`` and typed; choices are ``Literal[...]`` types. The base checks every field's type
and constraints (numbers inside ``Optional`` and lists too) when loading (errors name the file
and the key) and again in ``check_given`` (an object changed after loading). A class's own
``validate`` holds only rules across fields and never changes a value; values derived from
other fields are filled by ``normalize`` (run at construction, before any check). Values
written ``"@<key>/<relative path>"`` name bundled files (see :mod:`mke_plugins.bundled`).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import numbers
import operator
import os
import types
import typing
from dataclasses import MISSING, dataclass, field, fields
from pathlib import Path
from typing import Any, ClassVar

import yaml

from mke_hooks import HparamsError, close_matches
from mke_plugins.autoinstall import maybe_install
from mke_plugins.bundled import resolve_bundled

_DTYPES = {
    "float32": "float32", "fp32": "float32", "float": "float32",
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
}


_BOUNDS = (("ge", ">=", operator.ge), ("gt", ">", operator.gt), ("le", "<=", operator.le),
           ("lt", "<", operator.lt))
_FINITE_FIX = ("set a finite number such as 1e-3 (YAML reads .inf, .nan and out-of-range values such as "
               "1e999 as infinite or NaN).")


def hp(default: Any = MISSING, help: str = "", *, ge: float | None = None, gt: float | None = None,
       le: float | None = None, lt: float | None = None, finite: bool = True, nonempty: bool = False,
       distinct: bool = False, **kw: Any) -> Any:
    """A dataclass field with a ``help`` text and constraints the base checks (mutable defaults are copied).

    ``ge`` / ``gt`` / ``le`` / ``lt`` bound an ``int`` or ``float`` field, also the number inside
    ``Optional`` and every element of a list. A ``float`` field must be finite unless
    ``finite=False``. ``nonempty`` / ``distinct`` apply to a list. Choices are a ``Literal[...]`` type.
    """
    if not help:
        raise ValueError("every hyperparameter needs a help text")
    bounds = {name: b for name, b in (("ge", ge), ("gt", gt), ("le", le), ("lt", lt)) if b is not None}
    for name, bound in bounds.items():
        if isinstance(bound, bool) or not isinstance(bound, numbers.Real) or not math.isfinite(bound):
            raise ValueError(f"hp({name}=...) must be a finite number, got {bound!r}")
    meta = {"help": help, **bounds, "finite": finite, "nonempty": nonempty, "distinct": distinct}
    if isinstance(default, (list, dict)):
        value = default
        return field(default_factory=lambda: type(value)(value), metadata=meta, **kw)
    return field(default=default, metadata=meta, **kw)


def to_dtype(value: Any, *, path: str = "", key: str = "dtype") -> Any:
    """``"bfloat16"`` / ``"torch.bfloat16"`` / ``torch.bfloat16`` → ``torch.bfloat16``."""
    import torch

    if isinstance(value, torch.dtype):
        return value
    name = str(value).replace("torch.", "").strip().lower()
    if name not in _DTYPES:
        raise HparamsError(f"unknown dtype {value!r}.", path=path, key=key,
                           fix=f"use one of {sorted(set(_DTYPES.values()))}.")
    return getattr(torch, _DTYPES[name])


def resolve_special(value: Any) -> Any:
    """A bundled-file value (``"@world-model"``, ``"@ldke/world.pt"``) as an absolute path (``mke_plugins.bundled``)."""
    return resolve_bundled(value)


@dataclass
class MultimodalHyperParams:
    """Fields EasyEdit's multimodal editor, evaluators, datasets and trainer read.

    Subclasses set ``ALG_NAME`` (and optional ``ALG_ALIASES``) and add their own fields.
    """

    ALG_NAME: ClassVar[str] = ""
    ALG_ALIASES: ClassVar[dict[str, str]] = {}
    #: alg names that must be refused with an explanation (a different, similarly named method)
    ALG_REFUSED: ClassVar[dict[str, str]] = {}

    alg_name: str = hp("", "Method name as EasyEdit's alg_name, exact case.")
    model_name: Any = hp("", "Model path (also the family key for EasyEdit) or a (model, processor) tuple; "
                             "'@world-model' is the bundled world model.")
    device: Any = hp("cpu", "Device for EasyEdit's editor/evaluator ('cpu', 'cuda:0' or an int). "
                            "Methods take the device from the model's parameters.")
    dtype: Any = hp("float32", "Model dtype: float32, bfloat16 or float16 (converted to torch.dtype).")
    name: str = hp("", "Processor/tokenizer path used by EasyEdit's datasets and trainer; defaults to model_name.")
    exact_match: bool = hp(False, "EasyEdit field (ICL evaluator, BLIP trainer loss).")
    batch_size: int = hp(1, "EasyEdit forces 1 for multimodal edits.", ge=1)
    max_length: int = hp(40, "Maximum generated length where a method generates.", ge=1)
    tokenizer_class: str = hp("", "LAVIS families: tokenizer class name (EasyEdit reads it).")
    tokenizer_name: str = hp("", "LAVIS families: tokenizer path.")
    coco_image: str = hp("", "Image root of EasyEdit's VQA/caption datasets ('@world-data' for the world).")
    rephrase_image: str = hp("", "Image root of the rephrased images in EasyEdit's datasets.")
    model_class: str = hp("", "LAVIS families: EasyEdit model class (Blip2OPT, MiniGPT4).")
    state_dict_file: str = hp("", "LAVIS families: checkpoint of the multimodal wrapper.")
    qformer_name_or_path: str = hp("", "LAVIS families: Q-Former path.")
    qformer_checkpoint: str = hp("", "LAVIS families: Q-Former checkpoint.")
    pretrained_ckpt: str = hp("", "MiniGPT-4: pretrained projection checkpoint.")
    use_chat_template: bool = hp(True, "EasyEdit field read by some multimodal methods.")
    seed: int = hp(0, "Random seed for every nondeterministic step of the method.", ge=0)

    def __post_init__(self) -> None:
        self.normalize()

    def normalize(self) -> None:
        """Fill values derived from others; runs at construction and in ``check_given``, before any check.

        The base resolves bundled-file values (``"@<key>/<path>"``) of string fields. A subclass
        that derives a value (a default taken from another field, a canonical spelling) overrides
        this, calls ``super().normalize()``, and must stay idempotent.
        """
        for f in fields(self):
            value = getattr(self, f.name)
            if isinstance(value, str) and value.startswith("@"):
                setattr(self, f.name, resolve_bundled(value, key=f.name))

    # -- EasyEdit's HyperParams API ------------------------------------------------------
    @classmethod
    def from_hparams(cls, hparams_name_or_path: str | Path):
        """Load a YAML file (``.yaml`` is added when missing), strictly."""
        path = Path(str(hparams_name_or_path))
        if path.suffix not in (".yaml", ".yml", ".json"):
            path = path.with_name(path.name + ".yaml")
        return cls.from_config(read_yaml(path), path=str(path))

    @classmethod
    def from_json(cls, fpath: str | Path):
        return cls.from_hparams(fpath)

    @staticmethod
    def construct_float_from_scientific_notation(config: dict) -> dict:
        for key, value in config.items():
            if isinstance(value, str):
                try:
                    config[key] = float(value)
                except ValueError:
                    pass
        return config

    def to_dict(self) -> dict[str, Any]:
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            out[f.name] = str(v).replace("torch.", "") if f.name == "dtype" else v
        return out

    # -- strict construction -------------------------------------------------------------
    @classmethod
    def from_config(cls, config: dict[str, Any], *, path: str = "<dict>"):
        """Validate ``config`` against the dataclass and build an instance."""
        if not isinstance(config, dict):
            raise HparamsError("the file must hold a mapping of hyperparameters.", path=path,
                               fix="write `key: value` lines.")
        config = dict(config)
        names = {f.name: f for f in fields(cls)}
        unknown = [k for k in config if k not in names]
        if unknown:
            k = unknown[0]
            sugg = close_matches(k, names)
            raise HparamsError(
                f"unknown hyperparameter{'s' if len(unknown) > 1 else ''} {', '.join(map(repr, unknown))} "
                f"for {cls.__name__}.", path=path, key=k,
                fix=(f"did you mean {', '.join(map(repr, sugg))}? " if sugg else "")
                + "Remove the key or fix its name; `mke-plugins hparams METHOD MODEL` shows valid keys.")
        missing = [n for n, f in names.items() if n not in config
                   and f.default is MISSING and f.default_factory is MISSING]
        if missing:
            raise HparamsError(f"missing required keys: {', '.join(missing)}.", path=path,
                               key=missing[0], fix="add them to the file.")
        alg = config.get("alg_name", cls.ALG_NAME)
        if cls.ALG_NAME:
            alg = cls.ALG_ALIASES.get(alg, alg)
            if alg in cls.ALG_REFUSED:
                raise HparamsError(cls.ALG_REFUSED[alg], path=path, key="alg_name",
                                   fix=f"set `alg_name: {cls.ALG_NAME}`.")
            if alg != cls.ALG_NAME:
                raise HparamsError(f"alg_name is {alg!r} but this file is for {cls.ALG_NAME!r}.",
                                   path=path, key="alg_name", fix=f"set `alg_name: {cls.ALG_NAME}`.")
        elif not alg:
            raise HparamsError("alg_name is missing.", path=path, key="alg_name",
                               fix="add `alg_name: <method>`.")
        config["alg_name"] = alg
        hints = _hints(cls)
        for key, value in list(config.items()):
            value = resolve_bundled(value, path=path, key=key)  # here, so a deprecation warning names the file
            config[key] = _coerce(value, hints.get(key, Any), path=path, key=key)
        if "dtype" in config or "dtype" in names:
            config["dtype"] = to_dtype(config.get("dtype", names["dtype"].default), path=path)
        if not config.get("name") and isinstance(config.get("model_name"), str):
            config["name"] = config["model_name"]
        obj = cls(**config)
        check_fields(obj, path=path)
        obj.validate(path=path)
        maybe_install()  # easyeditor imported by a route the import hook did not see
        return obj

    def validate(self, *, path: str = "<dict>") -> None:
        """Hook for subclasses: rules across fields (each field's own constraints are ``hp``'s).

        Raise ``HparamsError`` naming the key to change; never change a value (see ``normalize``).
        A subclass calls ``super().validate(path=path)`` so that mixins' rules run too.
        """

    @classmethod
    def check_given(cls, hparams: Any) -> None:
        """What an apply function does first: ``hparams`` must be this class, and valid.

        EasyEdit hands the apply function whatever object the user built, so a wrong class (a
        plain dict, another method's hparams) gets a ``TypeError`` that says how to load the right
        one, and a right one with impossible values (changed after loading, or built by hand) gets
        the ``HparamsError`` loading would have raised. It normalises the object first.
        """
        if not isinstance(hparams, cls):
            raise TypeError(f"{cls.ALG_NAME} needs {cls.__name__} (load them with {cls.__name__}.from_hparams or "
                            f"load_hparams('{cls.ALG_NAME}', ...)), got {type(hparams).__name__}")
        hparams.normalize()
        check_fields(hparams, path="<hparams object>")
        hparams.validate(path="<hparams object>")

    @classmethod
    def field_help(cls) -> dict[str, str]:
        return {f.name: f.metadata.get("help", "") for f in fields(cls)}


class _DuplicateKey(Exception):
    def __init__(self, key: Any, first: int, again: int) -> None:
        super().__init__(key)
        self.key, self.first, self.again = key, first, again


class _StrictLoader(yaml.SafeLoader):
    """``SafeLoader`` (so ``!!python`` tags stay refused) that refuses duplicate mapping keys."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = self.construct_object(key_node, deep=deep)
            line = key_node.start_mark.line + 1
            if key in lines:
                raise _DuplicateKey(key, lines[key], line)
            lines[key] = line
        return super().construct_mapping(node, deep=deep)


def read_yaml(path: Path) -> dict[str, Any]:
    """Read a YAML mapping; errors name the file and the line (and the key, for a duplicate)."""
    if not path.is_file():
        raise HparamsError("file not found.", path=str(path),
                           fix="check the path, or use `mke-plugins hparams METHOD MODEL` to see bundled files.")
    try:
        data = yaml.load(path.read_text(), Loader=_StrictLoader)  # noqa: S506 - a SafeLoader
    except _DuplicateKey as dup:
        raise HparamsError(f"appears twice, on lines {dup.first} and {dup.again}; YAML would silently "
                           "keep only the last value.", path=str(path), key=str(dup.key),
                           fix=f"delete one of the two lines (line {dup.again} is the one that "
                               "would win).") from None
    except yaml.YAMLError as exc:
        raise HparamsError(f"not valid YAML: {exc}", path=str(path),
                           fix="fix the syntax at the line shown.") from None
    if data is None:
        raise HparamsError("the file is empty.", path=str(path), fix="add hyperparameters.")
    if not isinstance(data, dict):
        raise HparamsError("the file must hold a mapping of hyperparameters.", path=str(path),
                           fix="write `key: value` lines.")
    return data


def _coerce(value: Any, hint: Any, *, path: str, key: str) -> Any:
    """Convert YAML scalars to the annotated type; refuse values that cannot be converted."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if hint is Any or hint is None:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path=path, key=key)
            except HparamsError as e:
                errors.append(e)
        if errors:
            raise errors[0]
        return value
    if origin is typing.Literal:
        if value not in args:
            raise HparamsError(f"{value!r} is not allowed.", path=path, key=key,
                               fix=f"use one of {list(args)}.")
        return value
    if hint is bool:
        if isinstance(value, bool):
            return value
        raise HparamsError(f"expected true or false, got {value!r}.", path=path, key=key,
                           fix="write true or false.")
    if hint is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise HparamsError(f"expected a number, got {value!r}.", path=path, key=key,
                           fix="write a number such as 1e-3.")
    if hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        raise HparamsError(f"expected an integer, got {value!r}.", path=path, key=key,
                           fix="write a whole number.")
    if hint is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise HparamsError(f"expected a string, got {value!r}.", path=path, key=key, fix="quote it.")
    if origin in (list, tuple) or hint in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise HparamsError(f"expected a list, got {value!r}.", path=path, key=key,
                               fix="write a YAML list such as [1, 2].")
        inner = args[0] if args else Any
        return [_coerce(v, inner, path=path, key=key) for v in value]
    if origin is dict or hint is dict:
        if not isinstance(value, dict):
            raise HparamsError(f"expected a mapping, got {value!r}.", path=path, key=key,
                               fix="write a YAML mapping.")
        return value
    return value


@functools.lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def check_fields(obj: Any, *, path: str) -> None:
    """Raise ``HparamsError`` on the first field of ``obj`` whose value breaks its type or ``hp`` constraints."""
    hints = _hints(type(obj))
    for f in fields(obj):
        _check(getattr(obj, f.name), hints.get(f.name, Any), f.metadata, path=path, key=f.name)


def _check(value: Any, hint: Any, rules: Any, *, path: str, key: str, item: bool = False) -> None:
    """Check ``value`` against ``hint`` (choices, number types) and ``rules`` (``hp``'s metadata)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return
    if origin in (typing.Union, types.UnionType):
        arm = next((a for a in args if _is_a(value, a)), None)
        if arm is None:
            raise HparamsError(f"expected {_describe(hint)}, got {value!r}.", path=path, key=key,
                               fix=f"set {key} to {_describe(hint)}.")
        return _check(value, arm, rules, path=path, key=key, item=item)
    if not _is_a(value, hint):
        what = f"{value!r} is not allowed" if origin is typing.Literal else f"expected {_describe(hint)}, got {value!r}"
        raise HparamsError(f"{what}.", path=path, key=key, fix=f"set {key} to {_describe(hint)}.")
    if origin in (list, tuple) or hint in (list, tuple):
        _check_list(value, rules, path=path, key=key)
        for element in value:
            _check(element, args[0] if args else Any, rules, path=path, key=key, item=True)
    elif origin is dict:
        for element in value.values():
            _check(element, args[-1], rules, path=path, key=key, item=True)
    elif hint in (int, float):
        _check_number(value, rules, path=path, key=key, item=item, finite=hint is float)


def _is_a(value: Any, hint: Any) -> bool:
    """Whether ``value`` already has type ``hint`` (strict: no conversion; ints pass as floats)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if hint is Any:
        return True
    if origin in (typing.Union, types.UnionType):
        return any(_is_a(value, a) for a in args)
    if origin is typing.Literal:
        return any(value == a and isinstance(value, bool) == isinstance(a, bool) for a in args)
    if hint is float or hint is int:
        kind = numbers.Real if hint is float else numbers.Integral
        return isinstance(value, kind) and not isinstance(value, bool)
    if hint is str:
        return isinstance(value, (str, os.PathLike))
    if origin in (list, tuple) or hint in (list, tuple):
        return isinstance(value, (list, tuple))
    if origin is dict:
        return isinstance(value, dict)
    return isinstance(value, hint) if isinstance(hint, type) else True


def _describe(hint: Any) -> str:
    """``int | None`` -> "an integer or null", for messages."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_describe(a) for a in args)
    if origin is typing.Literal:
        return f"one of {list(args)}"
    names = {type(None): "null", bool: "true or false", int: "an integer", float: "a number", str: "a string",
             list: "a list", tuple: "a list", dict: "a mapping"}
    return names.get(origin or hint, getattr(hint, "__name__", str(hint)))


def _check_list(value: Any, rules: Any, *, path: str, key: str) -> None:
    if rules.get("nonempty") and not value:
        raise HparamsError("the list is empty.", path=path, key=key, fix=f"list at least one value in {key}.")
    if rules.get("distinct"):
        repeated = [v for i, v in enumerate(value) if v in value[:i]]
        if repeated:
            raise HparamsError(f"{list(value)!r} repeats {repeated[0]!r}.", path=path, key=key,
                               fix=f"list each value of {key} once.")


def _check_number(value: Any, rules: Any, *, path: str, key: str, item: bool, finite: bool) -> None:
    """Finiteness first (``nan`` fails every comparison), then every bound."""
    if finite and rules.get("finite", True) and not math.isfinite(float(value)):
        raise HparamsError(f"{float(value)!r} is not a finite number.", path=path, key=key, fix=_FINITE_FIX)
    bounds = [(sym, rules[name], op) for name, sym, op in _BOUNDS if name in rules]
    if any(not op(value, bound) for _, bound, op in bounds):
        rule = " and ".join(f"{sym} {bound}" for sym, bound, _ in bounds)
        subject = f"every element of {key}" if item else key
        raise HparamsError(f"{value!r} is out of range: {subject} must be {rule}.", path=path, key=key,
                           fix=f"set {subject} to a value {rule}.")


def is_hparams_class(obj: Any) -> bool:
    return isinstance(obj, type) and dataclasses.is_dataclass(obj) and hasattr(obj, "from_hparams")


def locate_hparams(method: str, model: str) -> Path:
    """The YAML for ``method`` on ``model``: a plugin's ``mke_locate_hparams`` answer, else bundled."""
    from .registry import get_registry

    registry = get_registry()
    entry = registry.get(method)
    found = registry.call_hook("mke_locate_hparams", method=method, model=model, first=True)
    if found:
        return Path(found[0])
    folder = entry.hparams_dir()
    if folder is not None:
        for suffix in (".yaml", ".yml"):
            if (folder / f"{model}{suffix}").is_file():
                return folder / f"{model}{suffix}"
    models = entry.hparams_models()
    sugg = close_matches(model, models)
    raise HparamsError(
        f"method {method!r} has no hyperparameters for model {model!r}.",
        fix=(f"did you mean {', '.join(map(repr, sugg))}? " if sugg else "")
        + f"Bundled models: {', '.join(models) or 'none'}; or pass a YAML path to "
        f"{entry.spec.hparams_cls if isinstance(entry.spec.hparams_cls, str) else 'the hparams class'}.from_hparams.")


def load_hparams(method: str, model: str, **overrides: Any):
    """Hyperparameters of ``method`` for ``model`` (e.g. ``load_hparams("DECODE", "world")``).

    Looks the file up through the ``mke_locate_hparams`` hook, then the method's bundled
    ``hparams/<model>.yaml``; lets plugins adjust it (``mke_adjust_hparams``); applies
    ``overrides``; validates strictly. ``model`` may also be a path to a YAML file. An error
    caused by an override names the override, not the file.
    """
    from .registry import get_registry

    maybe_install()  # before anything can fail: EasyEdit's editor needs the methods, not the hparams
    registry = get_registry()
    entry = registry.get(method)
    path = Path(model) if str(model).endswith((".yaml", ".yml")) else locate_hparams(method, model)
    config = read_yaml(path)
    registry.call_hook("mke_adjust_hparams", method=method, model=str(model), config=config)
    config.update(overrides)
    cls = entry.spec.resolved("hparams_cls")
    try:
        return cls.from_config(config, path=str(path))
    except HparamsError as exc:
        if exc.key not in overrides:
            raise
        raise override_error(exc, overrides[exc.key], f"load_hparams({method!r}, {model!r}, ...)") from None


def override_error(exc: HparamsError, value: Any, where: str) -> HparamsError:
    """``exc`` (about an overridden key) re-aimed at the override ``key=value`` given in ``where``."""
    shown = str(value).lower() if isinstance(value, bool) else value
    return HparamsError(exc.message, path=f"override {exc.key}={shown} in {where}", key=exc.key,
                        fix=exc.fix)
