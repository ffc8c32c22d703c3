"""``mke-plugins scale``: time one edit on a random-init model of a real checkpoint's size.

Real 7B checkpoints cannot be downloaded on the machines this project is built on, but what an
edit costs (seconds, peak memory, whether anything of vocabulary x FFN size is ever built)
depends on the model's shapes, not on its trained weights. This command builds a Qwen2-VL /
Qwen2.5-VL model of a published size from its config alone (random init, seeded), with the tiny
test tokenizer and processor (its token ids fit any vocabulary), takes the first bundled world
edit case with its pictures scaled up to a realistic size, and runs one single edit of each
method through the same apply-and-restore path as ``mke-plugins bench``. It reports wall time,
peak memory, the method's own statistics (steps per stage), one no-grad forward pass as the unit
of work, and whether the restore left every parameter bit-identical (checked by per-parameter
digests, so no second copy of the weights is held). Quality numbers on random weights mean
nothing and are not reported. Methods with an offline stage (a trained archive per model) are
refused: random weights have no archive.
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
from typing import Any

from mke_hooks import MKEError

EXAMPLES = """examples:
  mke-plugins scale --methods DECODE --family qwen2-vl --size 7b --device cuda --dtype bfloat16
  mke-plugins scale --methods "DECODE[max_steps=2],FT[max_steps=2]" --size 7b --image-size 224   # CPU
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


def build_random_model(family: str, size: str, *, device: str, dtype: str, seed: int, workdir: Path
                       ) -> tuple[Any, Any]:
    """``(model, processor)``: a seeded random-init model of ``family``/``size`` on ``device``."""
    import torch

    from mke_plugins.adapters.loading import seed_all
    from mke_plugins.adapters.processors import load_processor
    from mke_plugins.hparams import to_dtype
    from mke_plugins.testing.tiny import build_tiny

    proc = load_processor(build_tiny(family, workdir))
    proc.image_processor.size = dict(_QWEN_PIXELS)
    cfg, cls = _config(family, size, proc.tokenizer)
    seed_all(seed)
    with torch.device(device):
        model = cls._from_config(cfg, dtype=to_dtype(dtype))
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


def run_scale(methods: str, *, family: str = "qwen2-vl", size: str = "7b", device: str = "cpu",
              dtype: str = "bfloat16", image_size: int = 448, hparams_key: str | None = None, seed: int = 0,
              verify_restore: bool = True) -> dict[str, Any]:
    """One single edit per method on a random-init ``family``/``size`` model; the cost report."""
    import torch
    import transformers

    from mke_plugins.adapters import get_adapter
    from mke_plugins.adapters.base import Query
    from mke_plugins.adapters.loading import seed_all
    from mke_plugins.registry import get_registry

    from .cost import PeakMemory, sync
    from .methods import bind_ours, parse_methods
    from .restore import restore_like_easyedit
    from .runner import hparams_json, method_extra

    reqs = parse_methods(methods)
    for r in reqs:
        if r.easyedit:
            raise MKEError(f"{r.label}: scale runs this project's registered methods only")
        if get_registry().get(r.name).spec.offline is not None:
            raise MKEError(f"{r.label}: {r.name} needs its offline stage's archive for the model, and a random-init "
                           f"model has none; scale times methods without an offline stage")
    name = f"random-init-{family}-{size}"
    key = hparams_key or HPARAMS_KEY.get(family, "")
    common = {"device": device, "dtype": dtype, "model_name": name, "name": name}
    bound = [bind_ours(r, key, common) for r in reqs]
    with tempfile.TemporaryDirectory(prefix="mke-scale-") as tmp:
        t0 = time.perf_counter()
        model, proc = build_random_model(family, size, device=device, dtype=dtype, seed=seed, workdir=Path(tmp))
        build_s = time.perf_counter() - t0
        adapter = get_adapter(model, bound[0].hparams)
        request = scaled_request(adapter, image_size, Path(tmp))
        batch = adapter.batch(model, proc, [Query(request["image"], request["prompt"], request["target"])])
        dev = torch.device(device)
        with torch.no_grad():
            adapter.forward(model, batch)  # warm-up
            sync(dev)
            t1 = time.perf_counter()
            adapter.forward(model, batch)
            sync(dev)
            forward_s = time.perf_counter() - t1
        report: dict[str, Any] = {
            "family": family, "size": size, "device": device,
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor() or "cpu",
            "dtype": dtype, "parameters": sum(p.numel() for p in model.parameters()),
            "decoder_layers": model.config.text_config.num_hidden_layers,
            "image_size": image_size, "paired_tokens": int(batch.attention_mask.sum()),
            "image_tokens": int(batch.image_mask.sum()),
            "build_seconds": build_s, "forward_seconds": forward_s, "seed": seed, "hparams_key": key,
            "torch": torch.__version__, "transformers": transformers.__version__, "methods": {}}
        before = param_digests(model) if verify_restore else None
        for m in bound:
            seed_all(seed)
            with PeakMemory(dev) as mem:
                sync(dev)
                t2 = time.perf_counter()
                edited, wc = m.apply(model, proc, [dict(request)], m.hparams, copy=False, return_orig_weights=True,
                                     keep_original_weight=False)
                sync(dev)
                seconds = time.perf_counter() - t2
            stats = method_extra(wc)
            model = restore_like_easyedit(m.restore, model, edited, wc)
            del edited, wc
            exact = None if before is None else param_digests(model) == before
            report["methods"][m.label] = {
                "edit_seconds": seconds, "x_forward": seconds / forward_s, "peak_memory_mb": mem.peak_mb,
                "peak_memory_delta_mb": mem.delta_mb, "memory_source": mem.source,
                "restore_bit_exact": exact, "stats": stats, "hparams": hparams_json(m.hparams)}
    return report


def add_parser(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("scale", help="time one edit on a random-init model of a real size (e.g. 7B)",
                              description=__doc__, epilog=EXAMPLES,
                              formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--methods", default="DECODE",
                   help="comma-separated registered methods; NAME[key=value,...] overrides (default DECODE)")
    p.add_argument("--family", default="qwen2-vl", choices=sorted(SIZES), help="model family (default qwen2-vl)")
    p.add_argument("--size", default="7b", help="published size: 7b, 2b (qwen2-vl); test = tiny (default 7b)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--dtype", default="bfloat16", help="model dtype: bfloat16 (default), float16, float32")
    p.add_argument("--image-size", type=int, default=448,
                   help="side of the square edit picture in pixels (default 448 = 256 image tokens)")
    p.add_argument("--hparams", default=None,
                   help="bundled YAML key of each method (default: the family's 7B YAML, e.g. qwen2vl-7b)")
    p.add_argument("--seed", type=int, default=0, help="seed of the random weights and the edit (default 0)")
    p.add_argument("--no-verify-restore", dest="verify_restore", action="store_false",
                   help="skip the per-parameter digest check after the restore")
    p.add_argument("--json", default="scale-results.json", help="result file (default scale-results.json)")
    p.set_defaults(func=cmd_scale)
    return p


def cmd_scale(args: argparse.Namespace) -> int:
    if args.image_size < 28:
        raise MKEError(f"--image-size must be at least 28 pixels, got {args.image_size}")
    report = run_scale(args.methods, family=args.family, size=args.size, device=args.device, dtype=args.dtype,
                       image_size=args.image_size, hparams_key=args.hparams, seed=args.seed,
                       verify_restore=args.verify_restore)
    n = report["parameters"]
    count = f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"
    print(f"{report['family']} {report['size']} ({count} parameters, {report['dtype']}, "
          f"{report['device_name']}): paired query {report['paired_tokens']} tokens ({report['image_tokens']} image), "
          f"one forward {report['forward_seconds']:.2f} s, built in {report['build_seconds']:.0f} s")
    for label, r in report["methods"].items():
        print(f"  {label}: edit {r['edit_seconds']:.2f} s (x{r['x_forward']:.1f} forward), peak memory "
              f"{r['peak_memory_mb']:.0f} MB ({r['memory_source']}), restore bit-exact: {r['restore_bit_exact']}")
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2, default=str))
        print(f"wrote {args.json}")
    sys.stdout.flush()
    return 0
