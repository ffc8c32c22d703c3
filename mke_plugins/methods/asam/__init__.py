"""The built-in ASAM plugin: registers the method by name with string references.

ASAM (Wang et al., arXiv 2605.23780) trains a T-Patcher-style key-value neuron patch per edit on
the edit input *and* latent adversarial variants of it (LAR), with a rank-constrained alignment
loss on the variants' edit-layer states (RCSL), so the edit carries over to reworded questions
and other pictures of the same thing. See ``README.md``.

Importing this module imports no torch: every code reference is a ``"module:attr"`` string that
the registry resolves on first use.
"""

from __future__ import annotations

from mke_hooks import MethodSpec, hookimpl

PAPER = ("H. Wang, X. Liu, J. Su, J. Xiao, C. Chen. Beyond Binary Edits: Robust Multimodal Knowledge Editing "
         "with Adversarial Subspace Alignment. arXiv 2605.23780, 2026.")


@hookimpl
def mke_register_methods(register) -> None:
    register(MethodSpec(
        name="ASAM",
        hparams_cls="mke_plugins.methods.asam.asam_hparams:ASAMHyperParams",
        apply_multimodal="mke_plugins.methods.asam.asam_main:apply_asam_to_multimodal_model",
        restore="snapshot",
        offline="mke_plugins.methods.asam.asam_train:run",
        offline_flags="mke_plugins.methods.asam.asam_train:add_arguments",
        hparams_dir="mke_plugins.methods.asam:hparams",
        paper=PAPER,
        summary="Neuron-patch editor trained on latent adversarial variants of the edit with rank-constrained "
                "alignment of their edit-layer states, so edits hold for paraphrases and other pictures.",
    ))
