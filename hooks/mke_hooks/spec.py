"""``MethodSpec``: what a plugin tells the host about one editing method.

References to code may be given as objects or as ``"module:attr"`` strings. Strings are
resolved only on first use, so listing plugins and methods never imports torch.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Any, Callable, Literal, Union

from .errors import PluginError

Ref = Union[str, Callable[..., Any], type, None]

#: How EasyEdit undoes an edit (see ``hooks/EASYEDIT-NOTES.md``, "Restore"):
#: ``"snapshot"`` — ``weights_copy`` is the self-restoring dict (works with no restore-set entry);
#: ``"callable"`` — ``weights_copy`` is a bare callable (needs ``CALLABLE_RESTORE_ALGS``);
#: ``"peft"`` — the edited model is a PEFT model, restored by ``unload()`` (``PEFT_RESTORE_ALGS``);
#: ``"keep"`` — the edited model is kept (``KEEP_EDITED_MODEL_ALGS``).
RestorePolicy = Literal["snapshot", "callable", "peft", "keep"]
RESTORE_POLICIES: tuple[str, ...] = ("snapshot", "callable", "peft", "keep")


def resolve(ref: Ref) -> Any:
    """Turn a ``"module:attr"`` string into the object it names; pass objects through."""
    if ref is None or not isinstance(ref, str):
        return ref
    module_name, sep, attr = ref.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"reference {ref!r} must look like 'package.module:attribute'")
    obj: Any = importlib.import_module(module_name)
    for part in attr.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(frozen=True)
class MethodSpec:
    """One editing method, as registered by a plugin through ``mke_register_methods``.

    Attributes:
        name: EasyEdit ``alg_name``, exact case (``"DECODE"``, ``"UniKE"``).
        hparams_cls: hyperparameter dataclass with ``from_hparams(path)``.
        apply_multimodal: ``apply(model, tok, requests, hparams, copy=False,
            return_orig_weights=False, keep_original_weight=False, **kwargs)
            -> (edited_model, weights_copy)``, EasyEdit's multimodal apply signature.
        apply_text: optional text-only apply for EasyEdit's ``BaseEditor`` (``ALG_DICT``).
        restore: how ``weights_copy`` undoes the edit (see ``RestorePolicy``).
        trainer: optional EasyEdit ``EditableModel`` subclass trained by ``MultimodalTrainer``.
        offline: optional ``run(args: TrainArgs) -> int``, the offline stage behind
            ``mke-plugins train NAME`` (the host parses the common flags; see ``mke_hooks.TrainArgs``).
        offline_flags: optional ``add_arguments(group)`` adding the stage's own flags to
            ``mke-plugins train NAME`` (``group`` is an argparse argument group); their values
            reach the stage in ``TrainArgs.options``.
        hparams_dir: package-relative or absolute folder with ``<model>.yaml`` files.
        paper: citation of the method's paper.
        summary: one line for listings.
        registered_by: set by the host's registry, not by plugins: the label (distribution,
            version, entry point) of the plugin that registered the spec, named in errors.
    """

    name: str
    hparams_cls: Ref
    apply_multimodal: Ref
    apply_text: Ref = None
    restore: str = "snapshot"
    trainer: Ref = None
    offline: Ref = None
    offline_flags: Ref = None
    hparams_dir: str | None = None
    paper: str = ""
    summary: str = ""
    extra: dict[str, Any] = field(default_factory=dict, compare=False, hash=False)
    registered_by: str = field(default="", compare=False)

    def resolved(self, attr: str) -> Any:
        """The object behind ``attr`` (a reference string is imported now).

        Raises ``PluginError`` naming the method, the plugin and the reference when the
        reference cannot be imported.
        """
        ref = getattr(self, attr)
        try:
            return resolve(ref)
        except Exception as exc:
            raise PluginError(
                f"method {self.name!r}: {attr}={ref!r} cannot be resolved: "
                f"{type(exc).__name__}: {exc}.", plugin=self.registered_by,
                fix="install the module it names (and that module's dependencies), or correct "
                    "the 'package.module:attribute' reference in the plugin's MethodSpec.") from exc
