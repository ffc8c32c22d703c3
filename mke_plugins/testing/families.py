"""The real model families EasyEdit supports, as the method test suites check their YAMLs.

Every method ships one YAML per real family (``hparams/<stem>.yaml``) that cannot be run here:
the weights are 4–7 B parameters behind a model hub. What can be checked is that the layer
indices and module names in each YAML fit the same family's tiny model built from a config, and
that the decoder depth is the real one. This table is that shared knowledge: the YAML stem, the
tiny family that stands in for it, the real decoder depth, and the module-name patterns of the
decoder layers and of their FFN value matrix (``{i}`` = the layer index).
"""

from __future__ import annotations

from typing import NamedTuple


class RealFamily(NamedTuple):
    """One real-family YAML and what its tiny stand-in must agree with."""

    tiny: str     #: family name of the tiny model (``mke_plugins.testing.tiny``)
    n_layers: int  #: decoder layers of the real checkpoint
    layers: str   #: module name of decoder layer ``{i}``
    value: str    #: module name of decoder layer ``{i}``'s FFN value matrix


#: YAML stem -> the real family it configures
REAL_YAMLS: dict[str, RealFamily] = {
    "qwen2vl-7b": RealFamily("qwen2-vl", 28, "model.language_model.layers.{i}",
                             "model.language_model.layers.{i}.mlp.down_proj"),
    "qwen2.5vl-7b": RealFamily("qwen2.5-vl", 28, "model.language_model.layers.{i}",
                               "model.language_model.layers.{i}.mlp.down_proj"),
    "qwen3vl-4b": RealFamily("qwen3-vl", 36, "model.language_model.layers.{i}",
                             "model.language_model.layers.{i}.mlp.down_proj"),
    "llavaov-7b": RealFamily("llava-onevision", 28, "model.language_model.layers.{i}",
                             "model.language_model.layers.{i}.mlp.down_proj"),
    "blip2": RealFamily("blip2", 32, "opt_model.model.decoder.layers.{i}", "opt_model.model.decoder.layers.{i}.fc2"),
    "minigpt4": RealFamily("minigpt4", 32, "llama_model.model.layers.{i}",
                           "llama_model.model.layers.{i}.mlp.down_proj"),
}
