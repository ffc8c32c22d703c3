"""``mke-plugins world build|train|check|path``: the world's command group.

Registered by the main CLI through :func:`add_parser`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from .spec import DEFAULT_LAYOUT, DEFAULT_SEED, LAYOUTS


def _cmd_build(args: argparse.Namespace) -> int:
    from .build import build

    if args.layout != DEFAULT_LAYOUT and (args.entities is not None or args.edits is not None):
        print(f"mke-plugins world build: --entities/--edits size the {DEFAULT_LAYOUT} layout only; the "
              f"{args.layout} layout's sizes are fixed", file=sys.stderr)
        return 2
    out = build(args.out, seed=args.seed, n_entities=args.entities, n_edits=args.edits, layout=args.layout)
    files = "edit.json, dev.json, train.json, locality.json" if LAYOUTS[args.layout].n_dev else "edit.json, train.json"
    print(f"world seed {args.seed} ({args.layout}) written to {out} ({files}, world.json, images/)")
    return 0


def _cmd_train(args: argparse.Namespace) -> int:
    from .train import check_variant, train, with_curriculum

    try:
        check_variant(args.forms, args.layers, with_curriculum(args.layout, args.curriculum),
                      args.stages, args.text_aug)
    except ValueError as exc:
        print(f"mke-plugins world train: {exc}", file=sys.stderr)
        return 2

    prefix = "" if args.layout == DEFAULT_LAYOUT else f"{args.layout}-"
    out = Path(args.out or f"world-{prefix}qwen2-vl-seed{args.seed}")
    if "qwen2-vl" not in out.name:
        print(f"warning: {out.name!r} lacks 'qwen2-vl'; EasyEdit detects the family from the path",
              file=sys.stderr)
    steps = args.steps if args.steps is not None else LAYOUTS[args.layout].train_steps
    meta = train(out, seed=args.seed, steps=steps, batch_size=args.batch_size, lr=args.lr,
                 threads=args.threads, log=lambda s: print(s, flush=True), forms=args.forms, n_layers=args.layers,
                 layout=args.layout, curriculum=args.curriculum, stages=args.stages, text_aug=args.text_aug)
    print(json.dumps(meta["check"], indent=2))
    print(f"saved to {out}")
    return 0 if meta["check"]["floor_met"] else 1


def _cmd_check(args: argparse.Namespace) -> int:
    import torch

    from . import data_dir, load, model_path, record_paths
    from .build import make_split
    from .check import run_check
    from .spec import make_world

    torch.set_num_threads(args.threads)
    path = Path(args.model) if args.model else model_path(args.layout or DEFAULT_LAYOUT)
    meta_file = path / "world_model.json"
    meta = json.loads(meta_file.read_text()) if meta_file.exists() else {}
    seed = args.seed if args.seed is not None else meta.get("seed", DEFAULT_SEED)
    layout = args.layout or meta.get("layout", DEFAULT_LAYOUT)
    model, processor = load(path)
    world = make_world(seed, None, layout)
    records = record_paths("edit", data_dir(seed, layout=layout))
    report = run_check(model, processor, world, make_split(world), n=args.n, records=records)
    report["model"] = str(path)
    report["seed"] = seed
    report["layout"] = layout
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        for name, acc in report["accuracy"].items():
            print(f"{name:<28} {acc:.3f}")
        for form, rels in report["heldout_template_by_relation"].items():
            worst = sorted(rels.items(), key=lambda kv: kv[1])[:3]
            print(f"held-out templates, {form}: weakest relations " + ", ".join(f"{r} {a:.2f}" for r, a in worst))
        print("floor met" if report["floor_met"] else "FLOOR NOT MET: " + "; ".join(report["failures"]))
    return 0 if report["floor_met"] else 1


def _cmd_path(args: argparse.Namespace) -> int:
    from . import data_dir, model_path

    print(data_dir(layout=args.layout) if args.data else model_path(args.layout))
    return 0


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    """Register ``world`` and its subcommands on the main parser's ``subparsers``."""
    world = subparsers.add_parser("world", help="the synthetic world and its bundled model")
    sub = world.add_subparsers(dest="world_command", required=True)

    p = sub.add_parser("build", help="write edit.json, train.json and images for a seed")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED,
                   help=f"world seed (default {DEFAULT_SEED}: the bundled model's world)")
    p.add_argument("--out", required=True, help="output directory")
    _layout_arg(p)
    p.add_argument("--entities", type=int, default=None, help="entities (single layout; default 64)")
    p.add_argument("--edits", type=int, default=None, help="edit cases (single layout; default 200)")
    p.set_defaults(func=_cmd_build)

    p = sub.add_parser("train", help="train a world model from scratch on CPU (deterministic)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED)
    p.add_argument("--out", default=None, help="model directory (default ./world-qwen2-vl-seed<S>)")
    p.add_argument("--steps", type=int, default=None,
                   help="training steps (default: the layout's bundled model's, "
                        + " / ".join(f"{lay.train_steps} {name}" for name, lay in LAYOUTS.items()) + ")")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads (results depend on it; more threads are slower on a busy machine)")
    p.add_argument("--forms", default=None, metavar="FORM=W,...",
                   help="reweight the query-form mix, e.g. paired=0.25 (forms: paired, text, image, ident; "
                        "default paired=1,text=1,image=2,ident=2): for world variants")
    p.add_argument("--layers", type=int, default=None,
                   help="decoder layers (default 4, the bundled model's): for world variants")
    p.add_argument("--curriculum", default=None, choices=("composition", "composition-named"),
                   help="a layout that learns by composition (lifelong) trained with another staged curriculum "
                        "(default: the layout's, composition-named, which adds the named-slot text form and the "
                        "held-out templates' words as noise to composition, the previous bundled model's "
                        "recipe; world README): for world variants")
    p.add_argument("--stages", default=None, metavar="text=W,align=W,tune=W",
                   help="reshare the staged curriculum's steps (weights, normalised; default text=3000,"
                        "align=5500,tune=3500, the bundled model's), e.g. text=35,align=45,tune=20: for world "
                        "variants")
    p.add_argument("--text-aug", default=None, metavar="RATE,DROP",
                   help="word augmentation of the staged curriculum's text stage: share of questions "
                        "augmented, word-drop probability (default 0.8,0.25, the bundled model's; the other "
                        "stages 0.5,0.15), e.g. 0.5,0.15: for world variants")
    _layout_arg(p)
    p.set_defaults(func=_cmd_train)

    p = sub.add_parser("check", help="pre-edit accuracy per query form against the quality floor")
    p.add_argument("--model", default=None, help="model directory (default: the bundled one)")
    p.add_argument("--seed", type=int, default=None, help="world seed (default: the model's)")
    p.add_argument("--n", type=int, default=512, help="queries per set")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", action="store_true")
    _layout_arg(p, default=None, extra=" (default: the model's, else single)")
    p.set_defaults(func=_cmd_check)

    p = sub.add_parser("path", help="print the bundled model directory (--data: the world data)")
    p.add_argument("--data", action="store_true", help="print the default world's data directory")
    _layout_arg(p)
    p.set_defaults(func=_cmd_path)


def _layout_arg(p: argparse.ArgumentParser, default: str | None = DEFAULT_LAYOUT, extra: str = "") -> None:
    p.add_argument("--layout", choices=sorted(LAYOUTS), default=default,
                   help=f"single: the single-edit world (64 entities, 5 relations); lifelong: 160 entities, "
                        f"10 relations, a locality pool, 1,000-edit and development sequences, learnt by "
                        f"composition{extra or ' (default single)'}")
