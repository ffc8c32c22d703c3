"""Run one of our methods inside EasyEdit main's own MultimodalEditor, on the bundled world model.

    PYTHONPATH=/path/to/EasyEdit python examples/easyedit_editor.py --method DECODE

EasyEdit must be importable (a checkout of EasyEdit main on PYTHONPATH with its requirements;
see the README's contributor section). ``mke_plugins.install()`` injects our methods into
EasyEdit's registries; from then on EasyEdit's unmodified editor runs them by ``alg_name``.
``edit_dataset`` over the world's EasyEdit-format edit split uses EasyEdit's own ``VQADataset``.
"""

from __future__ import annotations

import argparse
import os
import tempfile

import mke_plugins
from mke_plugins import world


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--method", default="DECODE")
    parser.add_argument("--records", type=int, default=3)
    args = parser.parse_args()

    from easyeditor import MultimodalEditor, VQADataset

    report = mke_plugins.install()
    print(f"injected into EasyEdit: {', '.join(report.injected)}")
    hparams = mke_plugins.load_hparams(args.method, "world")
    os.chdir(tempfile.mkdtemp())  # EasyEdit writes logs/run.log under the working directory
    editor = MultimodalEditor.from_hparams(hparams)
    data = VQADataset(str(world.data_dir() / "edit.json"), size=args.records, config=hparams)
    metrics, _, _ = editor.edit_dataset(data, keep_original_weight=False, verbose=False)
    for i, m in enumerate(metrics):
        print(f"record {i}: rewrite_acc pre {float(m['pre']['rewrite_acc']):.2f} "
              f"-> post {float(m['post']['rewrite_acc']):.2f}")


if __name__ == "__main__":
    main()
