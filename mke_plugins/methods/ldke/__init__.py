"""The built-in LDKE plugin: registers the method by name with string references.

LDKE (Gu et al., arXiv 2605.29826) localises each fact to a few layers with one gradient pass
(Fast Localization), keeps the update as low-rank side weights, and routes every input to the
edited or the original weights with a trained Disentanglement Classifier, so edits reach
logically related queries without leaking into linked but irrelevant ones. See ``README.md``.

Importing this module imports no torch: every code reference is a ``"module:attr"`` string that
the registry resolves on first use.
"""

from __future__ import annotations

from pathlib import Path

from mke_hooks import MethodSpec, hookimpl
from mke_plugins.bundled import register_bundled

PAPER = ("L. Gu, Z. Zeng, F. Li, X. Gao, Z. Shi, X. Cao. Towards Localized and Disentangled Knowledge Editing "
         "for Multimodal Large Language Models. arXiv 2605.29826, 2026.")


def archives_dir() -> Path:
    """Folder of the archives shipped with LDKE (``@ldke/<file>`` in hyperparameters)."""
    return Path(__file__).resolve().parent / "archives"


register_bundled("ldke", archives_dir)


@hookimpl
def mke_register_methods(register) -> None:
    register(MethodSpec(
        name="LDKE",
        hparams_cls="mke_plugins.methods.ldke.ldke_hparams:LDKEHyperParams",
        apply_multimodal="mke_plugins.methods.ldke.ldke_main:apply_ldke_to_multimodal_model",
        restore="snapshot",
        trainer="mke_plugins.methods.ldke.trainable:LDKERouterTrainable",
        offline="mke_plugins.methods.ldke.ldke_train:run",
        offline_flags="mke_plugins.methods.ldke.ldke_train:add_arguments",
        hparams_dir="mke_plugins.methods.ldke:hparams",
        paper=PAPER,
        summary="Gradient-localized low-rank side weights, routed per input by a trained classifier, so edits "
                "reach related queries and spare linked but irrelevant ones.",
    ))
