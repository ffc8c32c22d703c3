"""``mke-plugins world build|train|check|path``: the world's command group.

Registered by the main CLI through :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .spec import DEFAULT_EDITS, DEFAULT_ENTITIES, DEFAULT_SEED


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build

    out = build(args.out, seed=args.seed, n_entities=args.entities, n_edits=args.edits)
    print(f"world seed {args.seed} written to {out} (edit.json, train.json, world.json, images/)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import check_variant, train

    try:
        check_variant(args.forms, args.layers)
    except ValueError as exc:
        print(f"mke-plugins world train: {exc}", file=sys.stderr)
        return 2

    out = Path(args.out or f"world-qwen2-vl-seed{args.seed}")
    if "qwen2-vl" not in out.name:
        print(f"warning: {out.name!r} lacks 'qwen2-vl'; EasyEdit detects the family from the path",
              file=sys.stderr)
    meta = train(out, seed=args.seed, steps=args.steps, batch_size=args.batch_size, lr=args.lr,
                 threads=args.threads, log=lambda s: print(s, flush=True), forms=args.forms, n_layers=args.layers)
    print(json.dumps(meta["check"], indent=2))
    print(f"saved to {out}")
    return 0 if meta["check"]["floor_met"] else 1


def _cmd_check(args: argparse.Namespace) -> int:
    import torch

    from . import load, model_path, record_paths
    from .build import build, make_split
    from .check import run_check
    from .spec import make_world

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else model_path()
    meta_file = path / "world_model.json"
    seed = args.seed
    if seed is None:
        seed = json.loads(meta_file.read_text())["seed"] if meta_file.exists() else DEFAULT_SEED
    model, processor = load(path)
    world = make_world(seed)
    records = None
    if seed == DEFAULT_SEED:
        records = record_paths("edit")
    else:
        import tempfile
        with tempfile.TemporaryDirectory() as d:
            build(d, seed=seed)
            records = record_paths("edit", d)
    report = run_check(model, processor, world, make_split(world), n=args.n, records=records)
    report["model"] = str(path)
    report["seed"] = seed
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, acc in report["accuracy"].items():
            print(f"{name:<28} {acc:.3f}")
        print("floor met" if report["floor_met"] else "FLOOR NOT MET: " + "; ".join(report["failures"]))
    return 0 if report["floor_met"] else 1


def _cmd_path(args: argparse.Namespace) -> int:
    from . import data_dir, model_path

    print(data_dir() if args.data else model_path())
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``world`` and its subcommands on the main parser's ``subparsers``."""
    world = subparsers.add_parser("world", help="the synthetic world and its bundled model")
    sub = world.add_subparsers(dest="world_command", required=True)

    p = sub.add_parser("build", help="write edit.json, train.json and images for a seed")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"world seed (default {DEFAULT_SEED}: the bundled model's world)")
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--entities", type=int, default=DEFAULT_ENTITIES)
    p.add_argument("--edits", type=int, default=DEFAULT_EDITS)
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("train", help="train a world model from scratch on CPU (deterministic)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--out", default=None, help="model directory (default ./world-qwen2-vl-seed<S>)")
    p.add_argument("--steps", type=int, default=4000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (results depend on it; more threads are slower on a busy machine)")
    p.add_argument("--forms", default=None, metavar="FORM=W,...",
                   help="reweight the query-form mix, e.g. paired=0.25 (forms: paired, text, image, ident; "
                        "default paired=1,text=1,image=2,ident=2): for world variants")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default 4, the bundled model's): for world variants")
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("check", help="pre-edit accuracy per query form against the quality floor")
    p.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    p.add_argument("--seed", type=int, default=None, help="world seed (default: the model's)")
    p.add_argument("--n", type=int, default=512, help="queries per set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("path", help="print the bundled model directory (--data: the world data)")
    p.add_argument("--data", action="store_true", help="print the default world's data directory")
    p.set_defaults(func=_cmd_path)
