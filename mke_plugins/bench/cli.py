"""``mke-plugins bench``: run methods on edit cases, print a table, write JSON and a plot.

With no arguments it runs every registered method with a ``world`` YAML (the FT and LoRA
baselines included) on the first cases of the bundled world, in single-edit mode.

Under ``torchrun`` / ``accelerate launch`` (``python -m mke_plugins bench``) the units of work are
shared among the processes and rank 0 writes the outputs; every finished unit is kept beside
``--json`` (one JSONL per rank) and ``--resume`` picks a killed run up where it stopped.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

from mke_hooks import MKEError

EXAMPLES = """examples:
  mke-plugins bench
  mke-plugins bench --methods FT,LoRA --cases 200 --json ft-lora.json --plot ft-lora.png
  mke-plugins bench --methods "DECODE,DECODE[group_mode=disjoint],LDKE[router=false]"
  mke-plugins bench --mode sequential --sequential-n 50 --cases 200
  mke-plugins bench --mode sequential --cases 1000 --checkpoints 1,10,100,1000 --methods FT,DECODE
  mke-plugins bench --data path/to/mmedit --model path/to/qwen2-vl-dir --hparams world
  mke-plugins bench --data vqa_eval.json --format mmedit-vqa --image-root coco --rephrase-image-root rephrase
  mke-plugins bench --methods FT,easyedit:WISE,easyedit:GRACE,easyedit:LoRA --mode sequential
  mke-plugins bench --methods FT,easyedit:GRACE --easyedit-hparams GRACE=hparams/GRACE/qwen2vl-7b.yaml
  torchrun --nproc_per_node 8 -m mke_plugins bench --device cuda --cases 1000 --json big.json
  accelerate launch --multi_gpu --num_processes 8 -m mke_plugins bench --device cuda --cases 1000
  mke-plugins bench --cases 1000 --json big.json --resume     # after a kill or Ctrl-C: only what is left
  mke-plugins bench --model path/to/qwen2-vl-72b --hparams qwen2vl-7b --dtype bfloat16 --device-map auto \
      --max-memory 0=70GiB,1=70GiB,2=70GiB
"""


def _easyedit_yaml(values: list[str] | None) -> dict[str, str]:
    out = {}
    for v in values or []:
        name, sep, path = v.partition("=")
        if not sep or not name or not path:
            raise MKEError(f"--easyedit-hparams {v!r}: write NAME=PATH")
        out[name.strip()] = path.strip()
    return out


def _checkpoints(text: str) -> list[int]:
    """``--checkpoints 1,10,100``: edit counts, each at least 1."""
    try:
        values = [int(t) for t in text.replace(" ", "").split(",") if t]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: write edit counts separated by commas, e.g. 1,10,100") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: every checkpoint must be at least 1")
    return sorted(set(values))


def add_placement_flags(p: Any) -> None:
    """``--device-map`` and ``--max-memory``: the same two flags on bench, scale and every offline stage.

    The strategy names are checked where the model loads
    (:func:`mke_plugins.adapters.placement.check_device_map`): building the parser imports no torch.
    """
    p.add_argument("--device-map", default=None, metavar="STRATEGY",
                   help="auto, balanced, balanced_low_0 or sequential: spread the model over this node's GPUs "
                        "through transformers/accelerate (auto: fill them in order); on a machine without GPUs "
                        "the model loads on the CPU. Weights the map would offload to cpu or disk are refused "
                        "(see README, 'Many GPUs / big models')")
    p.add_argument("--max-memory", default=None, metavar="DEV=SIZE,...",
                   help="with --device-map: memory per device, e.g. 0=20GiB,1=20GiB,cpu=60GiB or the same as JSON "
                        "('{\"0\": \"20GiB\"}')")


def resolve_device(device: str | None, device_map: str | None) -> str:
    """``--device``, defaulting to cpu, or with ``--device-map`` to cuda when a GPU is visible."""
    if device is not None:
        return device
    if device_map is not None:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    return "cpu"


def check_outputs(json_path: str | None, plot_path: str | None) -> None:
    """``--json`` and ``--plot`` can be written: checked before the run, not after it."""
    from .checks import check_output, check_plot_format

    if json_path:
        check_output(json_path, "--json")
    if plot_path:
        check_output(plot_path, "--plot")
        check_plot_format(plot_path)


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from . import DEFAULT_CASES
    from .formats import FORMAT_CHOICES

    p = subparsers.add_parser("bench", help="benchmark editing methods (default: all registered, on the world)",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", help="comma-separated methods; NAME[key=value,...] adds an ablation row; "
                                     "easyedit:NAME runs EasyEdit's own method (default: every registered method "
                                     "with a YAML for --hparams)")
    p.add_argument("--cases", type=int, default=DEFAULT_CASES,
                   help=f"use the first N records (default {DEFAULT_CASES}; 0 = all)")
    p.add_argument("--mode", choices=("single", "sequential"), default="single",
                   help="single: edit, evaluate, restore per case; sequential: edits accumulate")
    p.add_argument("--sequential-n", type=int, default=None,
                   help="sequential mode: edits per sequence, evaluated after the last (default: all cases)")
    p.add_argument("--checkpoints", type=_checkpoints, default=None, metavar="T,T,...",
                   help="sequential mode: also evaluate every edit made so far after T edits, for each T "
                        "(e.g. 1,10,100,1000), giving the curve in the JSON and a second plot (default: the end "
                        "of each sequence only)")
    p.add_argument("--json", default="bench-results.json",
                   help="result file (default bench-results.json); each process also appends every finished unit "
                        "of work to JSON.rank<R>.jsonl beside it ('' for neither)")
    p.add_argument("--resume", action="store_true",
                   help="skip the units of work the JSONL files beside --json already hold (the run must have the "
                        "same data, model, methods and hparams, or it is refused naming the difference); any "
                        "number of processes")
    p.add_argument("--plot", default="bench-results.png", help="plot file (default bench-results.png; '' for none)")
    p.add_argument("--data", help="benchmark JSON file or folder (default: the bundled world's edit split)")
    p.add_argument("--format", default="auto", choices=FORMAT_CHOICES,
                   help="record format of --data (default auto: detected from the first record)")
    p.add_argument("--image-root", help="folder of the records' image paths, EasyEdit's coco_image (default: the "
                                        "methods' hparams coco_image for EasyEdit-style formats, else the JSON's)")
    p.add_argument("--rephrase-image-root", help="folder of image_rephrase paths, EasyEdit's rephrase_image "
                                                 "(default: the hparams' rephrase_image, else the image root)")
    p.add_argument("--model", help="Hugging Face VLM directory to edit (default: the bundled world model)")
    p.add_argument("--world", choices=("single", "lifelong"), default="single",
                   help="which bundled world supplies the default --data, --model and --hparams: single, the "
                        "single-edit world (hparams key world), or lifelong, sized for 1,000-edit sequences "
                        "(hparams key lifelong; its development sequence is dev.json in "
                        "`mke-plugins world path --data --layout lifelong`)")
    p.add_argument("--hparams", default=None,
                   help="bundled YAML key of each method (default: world, or lifelong with --world lifelong)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed for the bench and every method's `seed` (default: methods keep their YAML seed)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default cpu; with --device-map: cuda "
                                                  "when a GPU is visible, the device EasyEdit's own methods use)")
    p.add_argument("--dtype", default="float32", help="model dtype: float32, bfloat16, float16")
    add_placement_flags(p)
    p.add_argument("--no-verify-restore", dest="verify_restore", action="store_false",
                   help="skip the bit-exact check of the model after each restore")
    p.add_argument("--no-generate", dest="generate", action="store_false",
                   help="skip greedy generation of the paired query (exact match)")
    p.add_argument("--per-case", action="store_true", help="also write every case's results into the JSON")
    p.add_argument("--probe-batch", type=int, default=64, help="probe rows per forward pass (default 64)")
    p.add_argument("--easyedit-hparams", action="append", metavar="NAME=PATH",
                   help="YAML for an easyedit:NAME method (repeatable; default: the bench's bundled "
                        "YAML for --hparams, shipped for WISE, GRACE and LoRA on the world)")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: 1 for models under 50M parameters on CPU, else torch's)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no progress bar")
    p.add_argument("-v", "--verbose", dest="traceback", action="store_true", default=argparse.SUPPRESS,
                   help="on an error, show the traceback too")
    p.set_defaults(func=cmd_bench)
    return p


def cmd_bench(args: argparse.Namespace) -> int:
    from mke_plugins.adapters.placement import check_device_map, parse_max_memory

    from .report import curve_path, has_curve, plot, plot_curve, table, write_json
    from .runner import BenchConfig, methods_from, run_bench

    check_device_map(args.device_map)
    max_memory = parse_max_memory(args.max_memory)
    if max_memory is not None and args.device_map is None:
        raise MKEError("--max-memory only applies with --device-map (e.g. --device-map auto --max-memory 0=20GiB)")
    cfg = BenchConfig(
        methods=methods_from(args.methods), cases=args.cases or None, mode=args.mode,
        sequential_n=args.sequential_n, data=args.data, image_root=args.image_root, format=args.format,
        rephrase_image_root=args.rephrase_image_root, model=args.model,
        hparams=args.hparams or ("world" if args.world == "single" else args.world), world=args.world,
        seed=args.seed, device=resolve_device(args.device, args.device_map), dtype=args.dtype,
        device_map=args.device_map, max_memory=max_memory,
        verify_restore=args.verify_restore, generate=args.generate, keep_cases=args.per_case,
        probe_batch=args.probe_batch, easyedit_hparams=_easyedit_yaml(args.easyedit_hparams),
        progress=args.progress, threads=args.threads, checkpoints=args.checkpoints,
        journal=args.json or None, resume=args.resume)
    if args.sequential_n is not None and args.mode != "sequential":
        raise MKEError("--sequential-n needs --mode sequential")
    if args.checkpoints is not None and args.mode != "sequential":
        raise MKEError("--checkpoints needs --mode sequential")
    check_outputs(args.json, args.plot)
    try:
        result = run_bench(cfg)
    except KeyboardInterrupt:  # several processes: each stops; their finished units are in the JSONL files
        if os.environ.get("RANK", "0") == "0":
            _interrupted_note(args.json)
        return 130
    if result is None:  # not rank 0: rank 0 writes the outputs
        return 0
    print(table(result))
    if args.json:
        print(f"wrote {write_json(result, args.json)}")
    if args.plot:
        print(f"wrote {plot(result, args.plot)}")
        if has_curve(result):
            print(f"wrote {plot_curve(result, curve_path(args.plot))}")
    sys.stdout.flush()
    if result.get("interrupted"):
        _interrupted_note(args.json)
        return 130
    return 0


def resume_command(argv: list[str] | None = None) -> str:
    """The command line that resumes this run: the same launcher and arguments, plus ``--resume``."""
    import shlex

    argv = list(sys.argv if argv is None else argv)
    rest = [a for a in argv[1:] if a != "--resume"] + ["--resume"]
    size = os.environ.get("WORLD_SIZE", "1")
    if size not in ("", "1"):
        per_node = os.environ.get("LOCAL_WORLD_SIZE") or size
        if any(k.startswith("ACCELERATE_") for k in os.environ):
            head = ["accelerate", "launch", "--multi_gpu", "--num_processes", size, "-m", "mke_plugins"]
        else:
            head = ["torchrun", "--nproc_per_node", per_node, "-m", "mke_plugins"]
    elif os.path.basename(argv[0]) == "mke-plugins":
        head = ["mke-plugins"]
    else:
        head = ["python", "-m", "mke_plugins"]
    return shlex.join(head + rest)


def _interrupted_note(json_path: str) -> None:
    if not json_path:
        print("interrupted; nothing was kept (--json ''): run it again", file=sys.stderr)
        return
    print(f"interrupted: the finished units are kept in {json_path}.rank*.jsonl; resume with:\n  "
          f"{resume_command()}", file=sys.stderr)
