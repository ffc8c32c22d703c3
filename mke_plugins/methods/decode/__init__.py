"""The built-in DECODE plugin: registers the method by name with string references.

DECODE (Fu et al., ACL 2026) localises, per edit, a text-specific and an image-specific group of
FFN neurons and edits each group's value columns with its own unimodal trigger, so an edit made
from picture + question also holds for text-only and image-only queries. See ``README.md``.

Importing this module imports no torch: every code reference is a ``"module:attr"`` string that
the registry resolves on first use.
"""

from __future__ import annotations

from mke_hooks import MethodSpec, hookimpl

PAPER = ("T. Fu, W. Wang, F. Li, H. Zhang, J. Zhang, D. Li, Y. Dong, R. Liu, W. Zhou. Correct When "
         "Paired, Wrong When Split: Decoupling and Editing Modality-Specific Neurons in MLLMs. ACL 2026, "
         "arXiv 2606.17057.")


@hookimpl
def mke_register_methods(register) -> None:
    register(MethodSpec(
        name="DECODE",
        hparams_cls="mke_plugins.methods.decode.decode_hparams:DECODEHyperParams",
        apply_multimodal="mke_plugins.methods.decode.decode_main:apply_decode_to_multimodal_model",
        restore="snapshot",
        hparams_dir="mke_plugins.methods.decode:hparams",
        paper=PAPER,
        summary="Edit text- and image-specific FFN neurons with unimodal triggers, so edits hold "
                "for text-only and image-only queries.",
    ))
