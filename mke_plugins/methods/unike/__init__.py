"""The built-in UniKE plugin: registers the method by name with string references.

UniKE (Pan et al., NeurIPS 2024) edits a multimodal LLM by treating intrinsic knowledge (new
FFN key-value neurons) and external knowledge (a latent memory of hidden states mixed into the
FFN inputs) as one key-value memory, and makes them collaborate through a semantic space (the
mixing weight α) and a truthfulness space (the direction ζ added to new values). See
``README.md``.

Importing this module imports no torch: every code reference is a ``"module:attr"`` string that
the registry resolves on first use. :func:`set_active` and :func:`restore_all` import lazily.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mke_hooks import MethodSpec, hookimpl
from mke_plugins.bundled import register_bundled

PAPER = ("K. Pan, Z. Fan, J. Li, Q. Yu, H. Fei, S. Tang, R. Hong, H. Zhang, Q. Sun. Towards Unified Multimodal "
         "Editing with Enhanced Knowledge Collaboration. NeurIPS 2024 (OpenReview kf80ZS3fVy).")


def archives_dir() -> Path:
    """Folder of the archives shipped with UniKE (``@unike/<file>`` in hyperparameters)."""
    return Path(__file__).resolve().parent / "archives"


register_bundled("unike", archives_dir, old="bundled")


@hookimpl
def mke_register_methods(register) -> None:
    register(MethodSpec(
        name="UniKE",
        hparams_cls="mke_plugins.methods.unike.unike_hparams:UniKEHyperParams",
        apply_multimodal="mke_plugins.methods.unike.unike_main:apply_unike_to_multimodal_model",
        restore="callable",
        trainer="mke_plugins.methods.unike.trainable:UniKETrainable",
        offline="mke_plugins.methods.unike.unike_train:run",
        hparams_dir="mke_plugins.methods.unike:hparams",
        paper=PAPER,
        summary="Intrinsic key-value neurons and an external latent memory as one key-value memory, "
                "collaborating through semantic (alpha) and truthfulness (zeta) spaces.",
    ))


def set_active(model: Any, on: bool = True) -> None:
    """Let UniKE's edits act on the bare model too (they always act through ``edited_model``)."""
    from .runtime import set_active as _set_active

    _set_active(model, on)


def restore_all(model: Any) -> None:
    """Remove every UniKE edit from ``model`` in one step (bit-identical to the original)."""
    from .runtime import restore_all as _restore_all

    _restore_all(model)
