"""Which methods a bench run compares, and how each one is called.

A method string is a registered name (``FT``), optionally with hyperparameter overrides for an
ablation row (``DECODE[group_mode=disjoint]``, ``ASAM[lar=false,rcsl=false]``; values parsed as
YAML scalars; the row is named exactly as written), or ``easyedit:NAME`` for a method from
EasyEdit's own ``ALG_MULTIMODAL_DICT`` (EasyEdit must be importable; its YAML comes from
``--easyedit-hparams NAME=PATH``, else from the bench's bundled ones, :mod:`.easyedit_rows`). A
method the bench cannot run as asked (IKE) is left out with a one-line reason, and the run goes on.

Our methods are called through :func:`mke_plugins.easyedit.make_apply`, the same wrapper
EasyEdit's editor gets; EasyEdit's through their registry entry, always with a list of requests.
Each bound method also knows how EasyEdit would restore it (``MethodSpec.restore`` for ours,
EasyEdit's restore sets for theirs).
"""

from __future__ import annotations

import importlib
import re
from dataclasses import dataclass, field
from typing import Any, Callable

import yaml

from mke_hooks import HparamsError, MKEError

EASYEDIT_PREFIX = "easyedit:"


class MethodRefused(MKEError):
    """A method the bench cannot run as asked; the run goes on without its row and says why in one line."""

#: EasyEdit methods the bench cannot run as editors (why)
EASYEDIT_REFUSED = {
    "IKE": "its apply returns in-context examples, not an edited model",
}
_NAME_RE = re.compile(r"^(easyedit:)?[A-Za-z0-9_\-.]*$")


@dataclass(frozen=True)
class MethodRequest:
    """One row of the bench: its label (as written), method name, source and overrides."""

    label: str
    name: str
    easyedit: bool = False
    overrides: dict[str, Any] = field(default_factory=dict)


def _split_top(text: str, what: str) -> list[str]:
    """Split at the commas outside brackets and braces."""
    items, depth, cur = [], 0, []
    for ch in text:
        if ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
            if depth < 0:
                raise MKEError(f"{what} {text!r}: '{ch}' without its opening bracket")
        if ch == "," and depth == 0:
            items.append("".join(cur).strip())
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise MKEError(f"{what} {text!r}: a '[' or '{{' is never closed")
    items.append("".join(cur).strip())
    return [i for i in items if i]


def split_methods(text: str) -> list[str]:
    """Split ``A,B[x=1,y=[2,3]],C`` at the commas outside brackets."""
    return _split_top(text, "--methods")


def parse_overrides(text: str, label: str) -> dict[str, Any]:
    """``k=v,k2=v2`` → dict with YAML-parsed values (scientific notation such as 1e-2 is a float)."""
    out: dict[str, Any] = {}
    for part in _split_top(text, f"method {label!r}"):
        if not part:
            continue
        key, sep, value = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise MKEError(f"method {label!r}: override {part!r} must look like key=value")
        try:
            parsed = yaml.safe_load(value.strip()) if value.strip() else ""
        except yaml.YAMLError as exc:
            raise MKEError(f"method {label!r}: value of {key!r} is not a YAML scalar: {exc}") from None
        if isinstance(parsed, str):  # YAML 1.1 reads 1e-2 as a string; EasyEdit reads it as a float
            try:
                parsed = float(parsed)
            except ValueError:
                pass
        out[key] = parsed
    return out


def parse_method(text: str) -> MethodRequest:
    """``NAME`` / ``NAME[k=v,...]`` / ``easyedit:NAME[...]`` → :class:`MethodRequest`.

    Values may be YAML flow collections (``LoRA[layers=[1, 2]]``).
    """
    label = text.strip()
    name, bracket, rest = label.partition("[")
    name = name.strip()
    if bracket and not rest.endswith("]"):
        raise MKEError(f"cannot read method {label!r}: the overrides must end with ']'")
    over = rest[:-1] if bracket else ""
    if not name or not _NAME_RE.match(name):
        raise MKEError(f"cannot read method {label!r}; write NAME or NAME[key=value,...]")
    easy = name.startswith(EASYEDIT_PREFIX)
    if easy:
        name = name[len(EASYEDIT_PREFIX):]
        if not name:
            raise MKEError(f"method {label!r}: name the EasyEdit method after 'easyedit:'")
    return MethodRequest(label, name, easy, parse_overrides(over, label))


def parse_methods(text: str) -> list[MethodRequest]:
    reqs = [parse_method(t) for t in split_methods(text)]
    labels = [r.label for r in reqs]
    dup = sorted({x for x in labels if labels.count(x) > 1})
    if dup:
        raise MKEError(f"--methods lists {dup} more than once")
    return reqs


@dataclass
class BoundMethod:
    """A method ready to run: its apply function, hyperparameters and EasyEdit restore policy."""

    request: MethodRequest
    apply: Callable[..., Any]
    hparams: Any
    restore: str  # "snapshot" | "callable" | "peft" | "keep"
    source: str  # plugin label or "EasyEdit"
    probe_rows: int | None = None  # most probe rows its edited model takes in one pass (None: any)
    notes: list[str] = field(default_factory=list)  # one line each, printed under the table

    @property
    def label(self) -> str:
        return self.request.label


def _apply_overrides(hparams: Any, overrides: dict[str, Any], label: str) -> None:
    for key, value in overrides.items():
        if not hasattr(hparams, key):
            raise MKEError(f"method {label!r}: {type(hparams).__name__} has no hyperparameter {key!r}")
        setattr(hparams, key, value)


def bind_ours(req: MethodRequest, hparams_key: str, common: dict[str, Any]) -> BoundMethod:
    """A registered method: hparams from its bundled YAML for ``hparams_key`` plus overrides."""
    from mke_plugins.easyedit import make_apply
    from mke_plugins.hparams import load_hparams, override_error
    from mke_plugins.registry import get_registry

    entry = get_registry().get(req.name)
    try:
        hparams = load_hparams(req.name, hparams_key, **{**common, **req.overrides})
    except HparamsError as exc:  # an override's fault is reported against the row as written
        if exc.key not in req.overrides:
            raise
        raise override_error(exc, req.overrides[exc.key], req.label) from None
    return BoundMethod(req, make_apply(entry), hparams, entry.spec.restore, entry.plugin.label)


def _easyedit_hparams_class(fn: Callable[..., Any], name: str) -> type:
    """The hyperparameter class in the package that defines EasyEdit's apply ``fn``."""
    owner = getattr(fn, "__self__", None)
    module_name = (type(owner).__module__ if owner is not None else getattr(fn, "__module__", "")) or ""
    parts = module_name.split(".")
    found: list[list[type]] = []  # the apply's module, then its package (WISE keeps its multimodal class there)
    for depth in range(len(parts), 1, -1):
        if len(found) == 2:
            break
        try:
            mod = importlib.import_module(".".join(parts[:depth]))
        except ImportError:
            continue
        classes = [v for k, v in vars(mod).items() if isinstance(v, type) and re.search(r"H(yper)?[Pp]arams$", k)
                   and hasattr(v, "from_hparams")]
        if classes:
            found.append(classes)
    multimodal = next(([c for c in classes if "multimodal" in c.__name__.lower()] for classes in found
                       if any("multimodal" in c.__name__.lower() for c in classes)), [])
    chosen = multimodal or (found[0] if found else [])
    if len(chosen) != 1:
        raise MKEError(f"easyedit:{name}: cannot tell its hyperparameter class from {module_name!r} "
                       f"(found {[c.__name__ for c in chosen]})")
    return chosen[0]


def bind_easyedit(req: MethodRequest, yaml_paths: dict[str, str], common: dict[str, Any],
                  hparams_key: str = "world") -> BoundMethod:
    """One of EasyEdit's own multimodal methods, called with a list of requests.

    Its YAML is ``yaml_paths[NAME]`` (``--easyedit-hparams``), else the bundled one for ``hparams_key``.
    """
    from mke_plugins.easyedit import easyedit_importable

    from .easyedit_rows import ONE_ROW_NOTE, resolve_values, wrap_apply, yaml_for

    name = req.name
    if name in EASYEDIT_REFUSED:
        raise MethodRefused(f"easyedit:{name} cannot be benched: {EASYEDIT_REFUSED[name]}")
    if not easyedit_importable():
        raise MKEError(f"easyedit:{name} needs EasyEdit (easyeditor) on PYTHONPATH; see README, 'Using a method "
                       f"from EasyEdit'")
    alg_dict = importlib.import_module("easyeditor.util.alg_dict")
    table = alg_dict.ALG_MULTIMODAL_DICT
    if name not in table:
        raise MKEError(f"easyedit:{name}: EasyEdit's ALG_MULTIMODAL_DICT has no {name!r}; it has "
                       f"{sorted(table)}")
    fn = table[name]
    cls = _easyedit_hparams_class(fn, name)
    hparams = cls.from_hparams(yaml_for(name, hparams_key, yaml_paths))
    resolve_values(hparams)
    if "dtype" in common:
        from mke_plugins.hparams import to_dtype

        common = dict(common, dtype=to_dtype(common["dtype"]))
    _apply_overrides(hparams, {k: v for k, v in common.items() if hasattr(hparams, k)}, req.label)
    _apply_overrides(hparams, req.overrides, req.label)
    try:
        utils = importlib.import_module("easyeditor.editors.utils")
    except ImportError:
        utils = None
    policy = "snapshot"
    for attr, pol in (("CALLABLE_RESTORE_ALGS", "callable"), ("PEFT_RESTORE_ALGS", "peft"),
                      ("KEEP_EDITED_MODEL_ALGS", "keep")):
        if utils is not None and name in getattr(utils, attr, ()):
            policy = pol
    return BoundMethod(req, wrap_apply(fn), hparams, policy, "EasyEdit", probe_rows=1, notes=[ONE_ROW_NOTE])


def bind(req: MethodRequest, *, hparams_key: str, common: dict[str, Any],
         easyedit_yaml: dict[str, str] | None = None) -> BoundMethod:
    """Resolve a :class:`MethodRequest` (``common`` overrides go first, the row's own win)."""
    if req.easyedit:
        return bind_easyedit(req, easyedit_yaml or {}, common, hparams_key)
    return bind_ours(req, hparams_key, common)


def bind_rows(reqs: list[MethodRequest], bind_one: Callable[[MethodRequest], BoundMethod]
              ) -> tuple[list[BoundMethod], list[str]]:
    """Bind every row; a refused one (:class:`MethodRefused`) is left out with its one-line reason.

    Returns the bound methods and the lines to print under the table: the refusals, then the
    bound methods' notes (each once).
    """
    bound, lines = [], []
    for req in reqs:
        try:
            bound.append(bind_one(req))
        except MethodRefused as exc:
            lines.append(str(exc))
    for m in bound:
        lines.extend(n for n in m.notes if n not in lines)
    return bound, lines
