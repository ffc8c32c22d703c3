"""``mke-plugins scale``: time one edit on a random-init model of a real checkpoint's size.

Real 7B checkpoints cannot be downloaded on the machines this project is built on, but what an
edit costs (seconds, peak memory, whether anything of vocabulary x FFN size is ever built)
depends on the model's shapes, not on its trained weights. This command builds a Qwen2-VL /
Qwen2.5-VL model of a published size from its config alone (random init, seeded), with the tiny
test tokenizer and processor (its token ids fit any vocabulary), takes the first bundled world
edit case with its pictures scaled up to a realistic size, and runs one single edit of each
method through the same apply-and-restore path as ``mke-plugins bench``, capped at ``--max-steps``
optimisation steps so that a CPU can afford it. Per method it reports seconds per step, the
capped edit's seconds, the full edit's estimate (seconds per step x the step count of the
method's uncapped YAML), each as a ratio to one forward+backward pass of the same request (every
weight gradient computed and freed as it is made, so no second copy of the weights is held; a
no-grad forward where even that runs out of memory, and the report says so), peak memory, the
method's own statistics, and whether the restore left every parameter bit-identical (checked by
per-parameter digests). Quality numbers on random weights mean nothing and are not reported.
Methods with an offline stage get an untrained stand-in for its output built at the model's
shapes through the method's own code (:mod:`.scale_prep`): timing does not depend on trained
values.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

from mke_hooks import MKEError

EXAMPLES = """examples:
  mke-plugins scale --methods DECODE,ASAM,LDKE,UniKE,FT,LoRA --size 7b --device cuda --max-steps 5
  mke-plugins scale --methods DECODE,ASAM,LDKE,UniKE,FT,LoRA --size 2b --dtype float32 --max-steps 2 \\
      --image-size 56 --json scale-2b.json                                                 # CPU
  mke-plugins scale --methods "DECODE[max_steps=2],FT[max_steps=2]" --size 7b --image-size 224
  mke-plugins scale --methods DECODE,FT --size 7b --device-map auto --max-memory 0=10GiB,1=10GiB --max-steps 5
"""

_QWEN_TEXT_7B = dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, rope_theta=1e6, mrope_section=[16, 24, 24])
_TEST_TEXT = dict(vocab_size=None, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                  num_attention_heads=2, num_key_value_heads=1, rope_theta=1e4, mrope_section=[2, 3, 3])

#: family -> size -> (text config, vision config) of the published checkpoints (``test``: a tiny one
#: for this command's own tests). ``vocab_size: None`` = the tokenizer's size; vision ``None`` = the
#: tiny models' tower (``mke_plugins.testing.tiny``, imported only when a model is built).
SIZES: dict[str, dict[str, tuple[dict[str, Any], dict[str, Any] | None]]] = {
    "qwen2-vl": {
        "7b": (_QWEN_TEXT_7B, dict(depth=32, embed_dim=1280, hidden_size=3584, num_heads=16, mlp_ratio=4)),
        "2b": (dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                    num_attention_heads=12, num_key_value_heads=2, rope_theta=1e6, mrope_section=[16, 24, 24],
                    tie_word_embeddings=True),
               dict(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4)),
        "test": (_TEST_TEXT, None),
    },
    "qwen2.5-vl": {
        "7b": (_QWEN_TEXT_7B, dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16,
                                   out_hidden_size=3584, window_size=112, fullatt_block_indexes=[7, 15, 23, 31])),
        "test": (_TEST_TEXT, None),
    },
}
#: family -> the bundled YAML key of each method for that family's real checkpoints
HPARAMS_KEY = {"qwen2-vl": "qwen2vl-7b", "qwen2.5-vl": "qwen2.5vl-7b"}
#: Qwen-VL's own pixel bounds (``qwen_vl_utils``): 4 .. 16384 merged 28x28 patches
_QWEN_PIXELS = {"shortest_edge": 4 * 28 * 28, "longest_edge": 16384 * 28 * 28}


def _config(family: str, size: str, tok: Any) -> tuple[Any, type]:
    """``(config, model class)`` of ``family`` at ``size`` around the tiny tokenizer ``tok``."""
    from mke_plugins.testing.tiny import QWEN2_TINY_VISION, QWEN25_TINY_VISION, qwen2_vl_config, round64

    if family not in SIZES:
        raise MKEError(f"--family {family!r}: choose one of {sorted(SIZES)}")
    if size not in SIZES[family]:
        raise MKEError(f"--size {size!r} for {family}: choose one of {sorted(SIZES[family])}")
    text, vision = SIZES[family][size]
    qwen25 = family == "qwen2.5-vl"
    if vision is None:
        vision = QWEN25_TINY_VISION if qwen25 else QWEN2_TINY_VISION
    text = dict(text)
    theta, section = text.pop("rope_theta"), text.pop("mrope_section")
    text.update(vocab_size=text["vocab_size"] or round64(len(tok)), max_position_embeddings=32768,
                rms_norm_eps=1e-6, hidden_act="silu",
                rope_parameters={"rope_type": "default", "rope_theta": theta, "mrope_section": section})
    return qwen2_vl_config(tok, text, vision, qwen25=qwen25)


def build_random_model(family: str, size: str, *, device: str, dtype: str, seed: int, workdir: Path,
                       device_map: str | None = None, max_memory: dict[Any, Any] | None = None) -> tuple[Any, Any]:
    """``(model, processor)``: a seeded random-init model of ``family``/``size`` on ``device``.

    With ``device_map`` the model is built on the CPU and spread over the GPUs
    (:func:`~mke_plugins.adapters.placement.spread`); a map that would offload weights is refused.
    """
    import torch

    from mke_plugins.adapters.loading import seed_all
    from mke_plugins.adapters.processors import load_processor
    from mke_plugins.hparams import to_dtype
    from mke_plugins.testing.tiny import build_tiny

    proc = load_processor(build_tiny(family, workdir))
    proc.image_processor.size = dict(_QWEN_PIXELS)
    cfg, cls = _config(family, size, proc.tokenizer)
    seed_all(seed)
    with torch.device("cpu" if device_map else device):
        model = cls._from_config(cfg, dtype=to_dtype(dtype))
    if device_map:
        from mke_plugins.adapters.placement import spread

        model = spread(model, device_map, max_memory, what=f"random-init {family} {size}")
    return model.eval(), proc


def scaled_request(adapter: Any, image_size: int, workdir: Path) -> dict[str, Any]:
    """The first world edit case, every picture resized to ``image_size`` pixels square."""
    from PIL import Image

    from mke_plugins import world

    from .data import IMAGE_FIELDS, PROBE_LISTS, load_requests, with_images

    _, (request,) = load_requests(str(world.data_dir()), cases=1)

    def scaled(path: str | None) -> str | None:
        if path is None:
            return None
        out = workdir / f"{image_size}-{Path(path).name}"
        with Image.open(path) as im:
            im.convert("RGB").resize((image_size, image_size), Image.BICUBIC).save(out)
        return str(out)

    for key in IMAGE_FIELDS.values():
        if key in request:
            request[key] = scaled(request[key])
    for key in PROBE_LISTS:
        if key in request:
            request[key] = [dict(item, image=scaled(item.get("image"))) for item in request[key]]
    return with_images([request], adapter)[0]


def param_digests(model: Any) -> dict[str, str]:
    """A digest of every parameter's and buffer's bytes (one tensor on the CPU at a time)."""
    import torch

    out = {}
    tensors = list(model.named_parameters(remove_duplicate=False)) + \
        [(f"buffer:{n}", b) for n, b in model.named_buffers(remove_duplicate=False) if b is not None]
    for name, t in tensors:
        data = t.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        out[name] = f"{t.dtype}:{tuple(t.shape)}:{hashlib.blake2b(data.tobytes(), digest_size=16).hexdigest()}"
    return out


#: untimed passes before each unit is timed, then the median of this many timed ones
UNIT_WARMUP, UNIT_REPEATS = 1, 3


def _oom(exc: BaseException) -> bool:
    return isinstance(exc, MemoryError) or "out of memory" in str(exc).lower()


def measure_units(adapter: Any, model: Any, batch: Any, device: Any, unit: str) -> dict[str, Any]:
    """The no-grad forward and, unless ``unit`` is ``forward`` or memory runs out, one forward+backward
    (every weight gradient computed, each freed as it is accumulated); ``kind`` says which is the unit."""
    import statistics

    import torch

    from .cost import as_devices, fwd_bwd_seconds, sync

    def forward() -> float:
        sync(device)
        t0 = time.perf_counter()
        adapter.forward(model, batch)
        sync(device)
        return time.perf_counter() - t0

    with torch.no_grad():
        for _ in range(UNIT_WARMUP):
            forward()
        out: dict[str, Any] = {"forward_seconds": statistics.median(forward() for _ in range(UNIT_REPEATS)),
                               "fwdbwd_seconds": None, "kind": "forward", "why": "--unit forward"}
    if unit == "forward":
        return out
    try:
        out["fwdbwd_seconds"] = fwd_bwd_seconds(adapter, model, batch, warmup=UNIT_WARMUP, repeats=UNIT_REPEATS,
                                                drop_grads=True)
        out.update(kind="fwd+bwd", why="")
    except (RuntimeError, MemoryError) as exc:
        if not _oom(exc):
            raise
        out["why"] = f"forward+backward ran out of memory ({str(exc).splitlines()[0][:120]})"
        if any(d.type == "cuda" for d in as_devices(device)):
            torch.cuda.empty_cache()
    return out


def step_costs(seconds: float, stats: dict[str, Any], cap: int | None, full_cap: int | None) -> dict[str, Any]:
    """Seconds per step and the full edit's estimate: seconds per step x the uncapped step count.

    The uncapped count is the steps taken scaled by ``full_cap / cap`` (DECODE's two stages each
    run ``max_steps``); an edit that stopped on its own rule ran in full already. The per-step
    time spreads the edit's fixed work (localisation, setup passes) over the steps taken, so with a
    small cap the estimate leans high.
    """
    steps = stats.get("steps")
    if not isinstance(steps, int) or steps <= 0:
        return {"steps": steps, "full_steps": None, "seconds_per_step": None, "full_edit_seconds_est": None}
    full = steps
    if cap and full_cap and not stats.get("converged"):
        full = round(steps * full_cap / cap)
    per = seconds / steps
    return {"steps": steps, "full_steps": full, "seconds_per_step": per, "full_edit_seconds_est": per * full}


def run_scale(methods: str, *, family: str = "qwen2-vl", size: str = "7b", device: str = "cpu",
              dtype: str = "bfloat16", image_size: int = 448, hparams_key: str | None = None, seed: int = 0,
              verify_restore: bool = True, max_steps: int | None = None, unit: str = "auto",
              progress: Callable[[dict[str, Any], str | None], None] | None = None,
              device_map: str | None = None, max_memory: dict[Any, Any] | None = None) -> dict[str, Any]:
    """One single edit per method on a random-init ``family``/``size`` model; the cost report.

    ``device_map`` / ``max_memory`` spread the model over this node's GPUs (``--device-map auto``).

    ``progress(report, label)`` is called once the unit is measured (``label`` None) and after
    each method, so a long run shows and keeps what it has measured so far.
    """
    import torch
    import transformers

    from mke_plugins.adapters import get_adapter
    from mke_plugins.adapters.base import Query
    from mke_plugins.adapters.loading import seed_all
    from mke_plugins.adapters.placement import model_devices

    from .cost import PeakMemory, sync
    from .methods import MethodRequest, bind_ours, parse_methods
    from .restore import restore_like_easyedit
    from .runner import hparams_json, method_extra
    from .scale_prep import PrepContext, check_preparable, prepare, step_cap, step_field

    reqs = parse_methods(methods)
    for r in reqs:
        if r.easyedit:
            raise MKEError(f"{r.label}: scale runs this project's registered methods only")
        check_preparable(r.name, r.label)
    name = f"random-init-{family}-{size}"
    key = hparams_key or HPARAMS_KEY.get(family, "")
    common = {"device": device, "dtype": dtype, "model_name": name, "name": name}
    bound, caps = [], {}
    for r in reqs:
        capped = MethodRequest(r.label, r.name, r.easyedit, {**step_cap(r.name, r.overrides, max_steps), **r.overrides})
        fld = step_field(r.name)
        full = getattr(bind_ours(MethodRequest(r.label, r.name), key, common).hparams, fld) if fld else None
        m = bind_ours(capped, key, common)
        caps[r.label] = (fld, getattr(m.hparams, fld) if fld else None, full)
        bound.append(m)
    with tempfile.TemporaryDirectory(prefix="mke-scale-") as tmp:
        t0 = time.perf_counter()
        model, proc = build_random_model(family, size, device=device, dtype=dtype, seed=seed, workdir=Path(tmp),
                                         device_map=device_map, max_memory=max_memory)
        build_s = time.perf_counter() - t0
        adapter = get_adapter(model, bound[0].hparams)
        request = scaled_request(adapter, image_size, Path(tmp))
        batch = adapter.batch(model, proc, [Query(request["image"], request["prompt"], request["target"])])
        devs = model_devices(model)  # one device, or every GPU of a spread model
        dev = next((d for d in devs if d.type == "cuda"), devs[0])
        units = measure_units(adapter, model, batch, devs, unit)
        unit_s = units["fwdbwd_seconds"] if units["kind"] == "fwd+bwd" else units["forward_seconds"]
        report: dict[str, Any] = {
            "family": family, "size": size, "device": ",".join(map(str, devs)),
            "device_map": getattr(model, "hf_device_map", None) if device_map else None,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_layers": model.config.text_config.num_hidden_layers,
            "image_size": image_size, "paired_tokens": int(batch.attention_mask.sum()),
            "image_tokens": int(batch.image_mask.sum()),
            "build_seconds": build_s, "forward_seconds": units["forward_seconds"],
            "fwdbwd_seconds": units["fwdbwd_seconds"], "unit": units["kind"], "unit_seconds": unit_s,
            "unit_note": units["why"], "max_steps": max_steps, "seed": seed, "hparams_key": key,
            "torch": torch.__version__, "transformers": transformers.__version__, "methods": {}}
        if progress is not None:
            progress(report, None)
        before = param_digests(model) if verify_restore else None
        ctx = PrepContext(model, proc, adapter, Path(tmp), key, seed)
        for r, m in zip(reqs, bound, strict=True):
            prep = prepare(r.name, m.hparams, r.overrides, ctx)
            seed_all(seed)
            with PeakMemory(devs) as mem:
                sync(devs)
                t2 = time.perf_counter()
                edited, wc = m.apply(model, proc, [dict(request)], m.hparams, copy=False, return_orig_weights=True,
                                     keep_original_weight=False)
                sync(devs)
                seconds = time.perf_counter() - t2
            stats = method_extra(wc)
            model = restore_like_easyedit(m.restore, model, edited, wc)
            del edited, wc
            exact = None if before is None else param_digests(model) == before
            fld, cap, full = caps[m.label]
            costs = step_costs(seconds, stats, cap, full)
            est = costs["full_edit_seconds_est"]
            report["methods"][m.label] = {
                "edit_seconds": seconds, "ratio": seconds / unit_s, "unit": units["kind"], **costs,
                "full_ratio_est": None if est is None else est / unit_s,
                "step_field": fld, "step_cap": cap, "full_step_cap": full,
                "peak_memory_mb": mem.peak_mb, "peak_memory_delta_mb": mem.delta_mb, "memory_source": mem.source,
                "peak_memory_per_device_mb": mem.per_device_mb or None,
                "prepared": None if prep is None else {"note": prep.note, "seconds": prep.seconds},
                "restore_bit_exact": exact, "stats": stats, "hparams": hparams_json(m.hparams)}
            if progress is not None:
                progress(report, m.label)
    return report


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    from .cli import add_placement_flags

    p = subparsers.add_parser("scale", help="time one edit on a random-init model of a real size (e.g. 7B)",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="DECODE",
                   help="comma-separated registered methods; NAME[key=value,...] overrides (default DECODE)")
    p.add_argument("--family", default="qwen2-vl", choices=sorted(SIZES), help="model family (default qwen2-vl)")
    p.add_argument("--size", default="7b", help="published size: 7b, 2b (qwen2-vl); test = tiny (default 7b)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu; ignored with --device-map)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype: bfloat16 (default), float16, float32")
    add_placement_flags(p)
    p.add_argument("--image-size", type=int, default=448,
                   help="side of the square edit picture in pixels (default 448 = 256 image tokens)")
    p.add_argument("--hparams", default=None,
                   help="bundled YAML key of each method (default: the family's 7B YAML, e.g. qwen2vl-7b)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the edit (default 0)")
    p.add_argument("--no-verify-restore", dest="verify_restore", action="store_false",
                   help="skip the per-parameter digest check after the restore")
    p.add_argument("--max-steps", type=int, default=None,
                   help="cap every method's optimisation steps per edit (its step field, e.g. DECODE max_steps, "
                        "LDKE edit_steps; a NAME[field=N] override wins); the full edit is estimated from it")
    p.add_argument("--unit", default="auto", choices=("auto", "forward"),
                   help="unit of the ratio: auto = one forward+backward of the request (a no-grad forward where "
                        "that runs out of memory), forward = a no-grad forward (default auto)")
    p.add_argument("--json", default="scale-results.json", help="result file (default scale-results.json)")
    p.set_defaults(func=cmd_scale)
    return p


def _fmt(x: float | None, spec: str = ".2f") -> str:
    return "-" if x is None else format(x, spec)


def _print_header(report: dict[str, Any]) -> None:
    n = report["parameters"]
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    print(f"{report['family']} {report['size']} random init ({count} parameters, {report['dtype']}, "
          f"{report['device_name']}): paired query {report['paired_tokens']} tokens ({report['image_tokens']} image), "
          f"built in {report['build_seconds']:.0f} s")
    print(f"unit = one {report['unit']} of the edit request: {report['unit_seconds']:.3f} s (no-grad forward "
          f"{report['forward_seconds']:.3f} s){'; ' + report['unit_note'] if report['unit_note'] else ''}")
    print("random weights: quality means nothing; untrained stand-ins replace offline stages (timing does not "
          "depend on trained values)")
    print("per method: steps taken (cap), s/step, capped edit s and x unit, full steps, estimated full edit s and "
          "x unit (s/step x full steps), peak memory, restore")


def _print_method(label: str, r: dict[str, Any]) -> None:
    print(f"  {label}: {r['steps']} steps ({r['step_field'] or 'no step field'}={r['step_cap']}), "
          f"{_fmt(r['seconds_per_step'])} s/step, edit {r['edit_seconds']:.2f} s = x{r['ratio']:.1f} "
          f"{r['unit']}; full {r['full_steps']} steps ~ {_fmt(r['full_edit_seconds_est'], '.1f')} s = "
          f"x{_fmt(r['full_ratio_est'], '.1f')}; peak {_fmt(r['peak_memory_mb'], '.0f')} MB "
          f"(+{_fmt(r['peak_memory_delta_mb'], '.0f')} over the loaded model, {r['memory_source']}); "
          f"restore bit-exact: {r['restore_bit_exact']}")
    if r["prepared"]:
        print(f"    before the edit ({r['prepared']['seconds']:.1f} s, untimed): {r['prepared']['note']}")


def cmd_scale(args: argparse.Namespace) -> int:
    from mke_plugins.adapters.placement import check_device_map, parse_max_memory

    check_device_map(args.device_map)
    max_memory = parse_max_memory(args.max_memory)
    if max_memory is not None and args.device_map is None:
        raise MKEError("--max-memory only applies with --device-map (e.g. --device-map auto --max-memory 0=20GiB)")
    if args.image_size < 28:
        raise MKEError(f"--image-size must be at least 28 pixels, got {args.image_size}")
    if args.max_steps is not None and args.max_steps < 1:
        raise MKEError(f"--max-steps must be at least 1, got {args.max_steps}")

    def progress(report: dict[str, Any], label: str | None) -> None:
        if label is None:
            _print_header(report)
        else:
            _print_method(label, report["methods"][label])
        if args.json:  # after every method, so an interrupted run keeps what it measured
            Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        sys.stdout.flush()

    run_scale(args.methods, family=args.family, size=args.size, device=args.device, dtype=args.dtype,
              image_size=args.image_size, hparams_key=args.hparams, seed=args.seed,
              verify_restore=args.verify_restore, max_steps=args.max_steps, unit=args.unit, progress=progress,
              device_map=args.device_map, max_memory=max_memory)
    if args.json:
        print(f"wrote {args.json}")
    sys.stdout.flush()
    return 0
