"""``mke-plugins train UniKE``: the offline stage without EasyEdit (spec §2, CLI driver).

One extraction pass over the train split (``UniKEOffline.observe`` on teacher-forced batches of
each record and, with ``include_variants``, its rephrased question and rephrased image), then
encoder epochs over the cached bank (``loss``), epoch selection by the held-out score
(sep_acc + sem_r1)/2 with ``patience``, then ``payload`` → one archive file.

    mke-plugins train UniKE --model world                      # hparams/training/world.yaml
    mke-plugins train UniKE --hparams my-training.yaml --data mmedit_train.json --image-root imgs/

The bundled world archive is rebuilt, bit-identically, by
``mke-plugins train UniKE --model world --out mke_plugins/methods/unike/archives/world.pt``.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any, Sequence

from mke_hooks import MKEError

log = logging.getLogger(__name__)

HPARAMS_DIR = Path(__file__).resolve().parent / "hparams" / "training"
EXTRACT_BATCH = 16


def training_yaml(model_key: str) -> Path:
    """The bundled training YAML for ``model_key`` (``hparams/training/<key>.yaml``)."""
    path = HPARAMS_DIR / f"{model_key}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in HPARAMS_DIR.glob("*.yaml"))
        raise MKEError(f"UniKE has no training hparams for model {model_key!r}; bundled: {', '.join(known)}. Pass "
                       f"--hparams FILE with your own training YAML.")
    return path


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mke-plugins train UniKE",
                                description="Build UniKE's offline archive (knowledge bank, encoders, zeta).")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--model", default=None, help="bundled training hparams key (default: world)")
    src.add_argument("--hparams", default=None, help="a training YAML (UniKETrainingHparams)")
    p.add_argument("--data", default=None, help="'@world-train' or an MMEdit-format JSON (default: the YAML's data)")
    p.add_argument("--image-root", default=None, help="image folder of --data (default: the JSON's folder)")
    p.add_argument("--out", default=None, help="archive path (default: the YAML's out, else ./unike-<model>.pt)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:0 ... (default: the YAML's device)")
    p.add_argument("--seed", type=int, default=None, help="override the YAML's seed")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    return p


# -- data --------------------------------------------------------------------------------------
def _image_bytes(image: Any) -> bytes:
    import torch
    from PIL import Image

    if image is None:
        return b""
    if isinstance(image, (list, tuple)):
        return b"".join(_image_bytes(i) for i in image)
    if isinstance(image, Image.Image):
        return image.tobytes()
    if torch.is_tensor(image):
        return image.detach().to("cpu", torch.float32).contiguous().numpy().tobytes()
    return str(image).encode()


def _mmedit_records(path: Path, image_root: Path, adapter: Any) -> list[dict[str, Any]]:
    from mke_plugins.adapters.images import image_for_family

    raw = json.loads(path.read_text())
    if not isinstance(raw, list):
        raise MKEError(f"--data {path}: expected a JSON list of MMEdit records (src, alt, image, rephrase, "
                       f"image_rephrase)")
    out = []
    for i, r in enumerate(raw):
        if not r.get("src") or not r.get("alt") or not r.get("image"):
            continue  # EasyEdit's VQADataset drops such records too
        def img(rel: str | None) -> Any:
            if not rel:
                return None
            f = image_root / rel
            if not f.is_file():
                raise MKEError(f"--data {path}: record {i}: image {f} not found; check --image-root")
            return image_for_family(adapter, f)
        out.append({"prompt": r["src"], "target": r["alt"], "image": img(r["image"]),
                    "rephrase_prompt": r.get("rephrase") or "", "image_rephrase": img(r.get("image_rephrase"))})
    return out


def load_records(data: str, image_root: str | None, adapter: Any) -> tuple[list[dict[str, Any]], str]:
    """``(records, dataset label)``; ``@world-train`` is the world's train split."""
    if data in ("@world-train", "@world"):
        from mke_plugins import world

        return world.records("train"), f"world:seed{world.DEFAULT_SEED}"
    path = Path(data)
    if path.is_dir() and (path / "train.json").is_file():
        path = path / "train.json"
    if not path.is_file():
        raise MKEError(f"--data {data}: no such file; pass '@world-train' or an MMEdit-format train JSON")
    root = Path(image_root) if image_root else path.parent
    return _mmedit_records(path, root, adapter), str(path)


def triplet_queries(records: list[dict[str, Any]], include_variants: bool, seed: int, cap: int
                    ) -> list[tuple[Any, str, str]]:
    """Shuffled, de-duplicated ``(Query, content hash, record hash)`` candidates (at most ``4 * cap``)."""
    from mke_plugins.adapters.base import Query

    from .archive import record_hash

    order = list(range(len(records)))
    random.Random(seed).shuffle(order)
    seen: set[str] = set()
    out = []
    for i in order:
        r = records[i]
        rh = record_hash(r["prompt"], r["target"])
        variants = [(r["image"], r["prompt"])]
        if include_variants:
            if r.get("rephrase_prompt"):
                variants.append((r["image"], r["rephrase_prompt"]))
            if r.get("image_rephrase") is not None:
                variants.append((r["image_rephrase"], r["prompt"]))
        for image, prompt in variants:
            h = hashlib.sha256(prompt.encode() + b"\x00" + r["target"].encode() + b"\x00" + _image_bytes(image))
            key = h.hexdigest()
            if key in seen:
                continue
            seen.add(key)
            out.append((Query(image, prompt, r["target"]), key, rh))
        if len(out) >= 4 * cap:  # enough candidates even if many are skipped
            break
    return out


# -- model -------------------------------------------------------------------------------------
def load_model(model_name: Any, device: str, dtype: Any) -> tuple[Any, Any]:
    """``(model, processor)`` for the training YAML's ``model_name`` (the world model or an HF directory)."""
    from mke_plugins import world

    name = str(model_name)
    if name.strip().lower() in ("blip2", "minigpt4"):
        raise MKEError(f"model_name {name!r}: the CLI cannot build EasyEdit's LAVIS wrappers; build the archive "
                       f"with EasyEdit's MultimodalTrainer (training YAML with `alg: UniKE`) instead")
    path = Path(name)
    if path.resolve() == world.model_path().resolve():
        return world.load(path, device=device, dtype=dtype)
    if not (path / "config.json").is_file():
        raise MKEError(f"model_name {name!r}: no config.json there; set model_name to a saved Hugging Face model "
                       f"directory (or '@world')")
    from transformers import AutoModelForImageTextToText

    from mke_plugins.adapters.processors import load_processor

    model = AutoModelForImageTextToText.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    return model.to(device).eval(), load_processor(path)


# -- driver ------------------------------------------------------------------------------------
def build_archive(hparams: Any, model: Any, tok: Any, records: list[dict[str, Any]], dataset: str, out: str, *,
                  progress: bool = True) -> dict[str, Any]:
    """Extraction, encoder epochs with held-out selection, archive. Returns a summary dict."""
    import torch
    from tqdm.auto import tqdm

    from mke_plugins.adapters import get_adapter

    from .offline import UniKEOffline

    t0 = time.time()
    adapter = get_adapter(model, hparams)
    off = UniKEOffline(model, tok, hparams, adapter, dataset=dataset, split="train")
    cands = triplet_queries(records, bool(hparams.include_variants), int(hparams.seed), int(hparams.bank_size))
    bar = tqdm(total=len(cands), desc="UniKE bank", unit="triplet", disable=not progress)
    for s in range(0, len(cands), EXTRACT_BATCH):
        if off.bank_size >= int(hparams.bank_size):
            break
        part = cands[s:s + EXTRACT_BATCH]
        batch = adapter.batch(model, tok, [q for q, _, _ in part])
        off.observe(batch, add_to_bank=True, hashes=[h for _, h, _ in part], record_hashes=[r for _, _, r in part])
        bar.update(len(part))
    bar.close()
    t_extract = time.time() - t0
    n = off.bank_size
    if n == 0:
        raise MKEError("UniKE offline: no usable triplet (the model already predicts every target); check the data")
    gen = torch.Generator().manual_seed(int(hparams.seed))
    perm = torch.randperm(n, generator=gen)
    n_hold = int(round(float(hparams.holdout) * n))
    if float(hparams.holdout) > 0 and n >= 10:
        n_hold = max(1, n_hold)
    hold, train = perm[:n_hold], perm[n_hold:]
    off.replay_exclude = hold
    opt = torch.optim.Adam(off.encoder_parameters(), lr=float(hparams.enc_lr))
    bs = int(hparams.enc_batch_size)
    best: tuple[float, int, dict[str, Any]] | None = None
    history = []
    stale = 0
    bar = tqdm(range(int(hparams.enc_epochs)), desc="UniKE encoders", unit="epoch", disable=not progress)
    for epoch in bar:
        off.train()
        order = train[torch.randperm(len(train), generator=gen)]
        losses = []
        for s in range(0, len(order), bs):
            loss, parts = off.loss(off.bank_states(order[s:s + bs]))
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        off.eval()
        stats = evaluate_holdout(off, hold, train, bs)
        score = (stats["sep_acc"] + stats["sem_r1"]) / 2 if len(hold) else -float(sum(losses) / max(1, len(losses)))
        history.append({"epoch": epoch, "loss": sum(losses) / max(1, len(losses)), **stats, "score": score})
        bar.set_postfix(loss=f"{history[-1]['loss']:.3f}", sep=f"{stats['sep_acc']:.3f}", r1=f"{stats['sem_r1']:.3f}")
        if best is None or score > best[0]:
            best = (score, epoch, copy.deepcopy(off.state_dict()))
            stale = 0
        else:
            stale += 1
            if stale >= int(hparams.patience):
                break
    bar.close()
    assert best is not None
    off.load_state_dict(best[2])
    off.eval()
    path = off.save(out)
    final = evaluate_holdout(off, hold, train, bs)
    return {"archive": path, "seconds": round(time.time() - t0, 1), "extract_seconds": round(t_extract, 1),
            "triplets": off.n_triplets, "skipped": off.n_skipped, "holdout": int(len(hold)),
            "best_epoch": best[1], "epochs_run": len(history), "sep_acc": final["sep_acc"],
            "sem_r1": final["sem_r1"], "layers": off.layers, "d": off.d, "d_t": off.d_t}


def evaluate_holdout(off: Any, hold: Any, train: Any, bs: int) -> dict[str, float]:
    """Held-out sep_acc (training-bank centroids) and sem_r1 (within held-out chunks)."""
    if len(hold) == 0:
        return {"sep_acc": float("nan"), "sem_r1": float("nan")}
    c = off.centroids(train)
    sep = r1 = 0.0
    for s in range(0, len(hold), bs):
        part = hold[s:s + bs]
        stats = off.evaluate(off.bank_states(part), centroids=c)
        sep += stats["unike/sep_acc"] * len(part)
        r1 += stats["unike/sem_r1"] * len(part)
    return {"sep_acc": sep / len(hold), "sem_r1": r1 / len(hold)}


def run(argv: Sequence[str] | None = None) -> int:
    """``mke-plugins train UniKE ...`` (the ``MethodSpec.offline`` entry)."""
    args = _parser().parse_args(list(argv) if argv is not None else None)
    from mke_plugins.hparams import resolve_special

    from .unike_hparams import UniKETrainingHparams

    path = Path(args.hparams) if args.hparams else training_yaml(args.model or "world")
    hparams = UniKETrainingHparams.from_hparams(str(path))
    if args.seed is not None:
        hparams.seed = int(args.seed)
    if args.data:
        hparams.data = args.data
    if args.image_root:
        hparams.image_root = args.image_root
    device = str(args.device or hparams.device)
    if device.isdigit():
        device = f"cuda:{device}"
    model, tok = load_model(resolve_special(hparams.model_name), device, hparams.dtype)
    from mke_plugins.adapters import get_adapter

    records, dataset = load_records(str(hparams.data), hparams.image_root or None, get_adapter(model, hparams))
    base = Path(str(hparams.model_name)).name or "model"
    out = args.out or hparams.out or f"unike-{base}.pt"
    summary = build_archive(hparams, model, tok, records, dataset, out, progress=not args.quiet)
    print(json.dumps(summary))
    sys.stdout.flush()
    return 0
