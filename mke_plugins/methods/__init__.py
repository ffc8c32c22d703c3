"""The built-in methods (each subpackage is a plugin module, see ``mke_plugins.plugins``).

Their bundled ``world.yaml`` files name the world's model and data folder as ``@world-model``
and ``@world-data`` (``lifelong.yaml``: ``@lifelong-model`` and ``@lifelong-data``, the lifelong
world's); those keys are contributed here as references (importing the world costs numpy),
resolved on first use. ``@world`` is the deprecated spelling of ``@world-model``.
"""

from mke_plugins.bundled import register_bundled

register_bundled("world-model", "mke_plugins.world:model_path", old="world")
register_bundled("world-data", "mke_plugins.world:data_dir")
register_bundled("lifelong-model", "mke_plugins.world:lifelong_model_path")
register_bundled("lifelong-data", "mke_plugins.world:lifelong_data_dir")
