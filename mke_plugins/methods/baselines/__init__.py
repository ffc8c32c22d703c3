"""The built-in baselines plugin: ``FT`` and ``LoRA``, registered like any other method.

The bench compares every method with these two, so they go through exactly the same path as
the methods under test (registry, ``make_apply``, EasyEdit's restore rules, the conformance
kit). Both train on the paired edit query only (picture + question), built the way EasyEdit's
evaluator builds it, and stop as soon as every target token is the argmax:

* ``FT`` fine-tunes one decoder layer's FFN value matrix (``down_proj`` / ``fc2``) with Adam and
  restores it from an exact snapshot.
* ``LoRA`` puts peft LoRA adapters (plain ``lora``) on modules of the same layer chosen by name
  suffix (``q_proj``, ``v_proj`` by default) and removes them again on restore, so the module
  tree and every weight are bit-identical afterwards.

EasyEdit has its own ``FT`` (text) and ``LoRA`` (multimodal): the bridge never injects ours over
them; they are available to ``mke-plugins bench`` and the conformance kit. Importing this module
imports no torch: the references are ``"module:attr"`` strings.
"""

from __future__ import annotations

from mke_hooks import MethodSpec, hookimpl


@hookimpl
def mke_register_methods(register) -> None:
    register(MethodSpec(
        name="FT",
        hparams_cls="mke_plugins.methods.baselines.ft.ft_hparams:FTHyperParams",
        apply_multimodal="mke_plugins.methods.baselines.ft.ft_main:apply_ft_to_multimodal_model",
        restore="snapshot",
        hparams_dir="mke_plugins.methods.baselines:hparams/ft",
        paper="Baseline: fine-tuning one FFN value matrix (as in MMEdit's FT-LLM, Cheng et al., EMNLP 2023).",
        summary="Baseline: Adam on one layer's FFN value matrix, paired edit query, early stop at success.",
    ))
    register(MethodSpec(
        name="LoRA",
        hparams_cls="mke_plugins.methods.baselines.lora.lora_hparams:LoRAHyperParams",
        apply_multimodal="mke_plugins.methods.baselines.lora.lora_main:apply_lora_to_multimodal_model",
        restore="snapshot",
        hparams_dir="mke_plugins.methods.baselines:hparams/lora",
        paper="Baseline: LoRA (Hu et al., ICLR 2022) via peft, on one decoder layer.",
        summary="Baseline: peft LoRA on one layer's modules, paired edit query, removed on restore.",
    ))
