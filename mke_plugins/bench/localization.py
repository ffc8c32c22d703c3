"""``python -m mke_plugins.bench.localization``: LDKE's localization cost report on the bundled world.

LDKE's Fast Localization is compared with the causal traces on the same edits by
:func:`mke_plugins.methods.ldke.compare.compare_localization` (see the LDKE README,
"Localization cost"). The method does
not import the world, so this driver, beside the bench that owns the world's edit cases, loads
the model and the edits and hands them over::

    python -m mke_plugins.bench.localization --edits 50 --json ldke-localization.json

Defaults: the bundled world model, its edit split and LDKE's ``world`` hyperparameters.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m mke_plugins.bench.localization", description=__doc__.splitlines()[0])
    p.add_argument("--edits", type=int, default=50, help="edit requests timed (first N; default 50)")
    p.add_argument("--warmup", type=int, default=3, help="first edits dropped from the medians (default 3)")
    p.add_argument("--hparams", default="world", help="LDKE hparams key or YAML path (default world)")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--json", default=None, help="write the report here")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    import torch

    from mke_plugins import world
    from mke_plugins.adapters.loading import load_vlm
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.ldke.compare import compare_localization

    if args.device == "cpu" and args.threads:
        torch.set_num_threads(args.threads)
    hp = load_hparams("LDKE", args.hparams, device=args.device)
    model, tok = load_vlm(world.model_path(), args.device)
    requests = world.records("edit")[: args.edits + args.warmup]
    report = compare_localization(model, tok, requests, hp, warmup=args.warmup)
    text = json.dumps(report, indent=1)
    print(text)
    if args.json:
        Path(args.json).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
