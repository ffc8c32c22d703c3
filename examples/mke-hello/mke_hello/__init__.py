"""mke-hello: a complete third-party plugin for mke-plugins, as a template.

It registers one real editing method, ``HelloFT``: fine-tune the MLP value matrix of one
decoder layer on the edit's paired prompt until every target token is predicted. References
are ``"module:attr"`` strings, so listing plugins imports no torch.
"""

from mke_hooks import MethodSpec, hookimpl


@hookimpl
def mke_register_methods(register):
    register(MethodSpec(
        name="HelloFT",
        hparams_cls="mke_hello.hello_hparams:HelloFTHyperParams",
        apply_multimodal="mke_hello.hello_main:apply_hello_to_multimodal_model",
        restore="snapshot",
        hparams_dir="mke_hello:hparams",
        summary="Example plugin: fine-tune one MLP value matrix on the edit prompt.",
    ))
