"""``mke-plugins train UniKE``: build UniKE's offline archive (knowledge bank, encoders, zeta) without EasyEdit.

The CLI driver of the offline stage (README, "Offline stage"): one extraction pass over the
training records the host provides (``UniKEOffline.observe`` on teacher-forced batches of each
record and, with ``include_variants``, its rephrased question and rephrased image), then encoder
epochs over the cached bank (``loss``), epoch selection by the held-out score (sep_acc + sem_r1)/2
with ``patience``, then ``payload`` → one archive file.

    mke-plugins train UniKE                                     # hparams/training/world.yaml
    mke-plugins train UniKE --hparams my-training.yaml --model DIR --data mmedit_train.json --image-root imgs/

The bundled world archive is rebuilt, bit-identically, by
``mke-plugins train UniKE --hparams world --out mke_plugins/methods/unike/archives/world.pt``.

:func:`untrained_archive` runs the extraction alone on a few queries and saves the freshly
initialised encoders untrained, for timing an edit on a random-init model (``mke-plugins scale``).
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import random
import sys
import time
from pathlib import Path
from typing import Any

from mke_hooks import MKEError, TrainArgs

log = logging.getLogger(__name__)

EXTRACT_BATCH = 16


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


def untrained_archive(hparams: Any, model: Any, tok: Any, queries: list[Any], out: str | Path) -> str:
    """An archive at ``model``'s shapes whose encoders were never trained, written to ``out``; its path.

    The extraction of :func:`build_archive` on ``queries`` (adapter Queries; their triplets form
    the bank, their states mu and the W_zeta fit), then the payload with the encoders as
    initialised (seeded by ``hparams.seed``): no epochs, no held-out selection, no record hashes.
    What an edit on it costs (retrieval, memory mixing, the training loop) does not depend on the
    trained values; its answers mean nothing. The archive's ``split`` is ``"untrained"``.
    """
    from mke_plugins.adapters import get_adapter

    from .offline import UniKEOffline

    adapter = get_adapter(model, hparams)
    off = UniKEOffline(model, tok, hparams, adapter, dataset="untrained", split="untrained")
    for s in range(0, len(queries), EXTRACT_BATCH):
        off.observe(adapter.batch(model, tok, list(queries[s:s + EXTRACT_BATCH])), add_to_bank=True)
    if off.bank_size == 0:
        raise MKEError("UniKE untrained archive: the model already predicts every query's target, so no triplet "
                       "was banked; pass queries whose targets it gets wrong")
    off.eval()
    return off.save(str(out))


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


def run(args: TrainArgs) -> int:
    """``mke-plugins train UniKE`` (``MethodSpec.offline``): extract the bank, train the encoders, write the archive.

    Defaults: --data the YAML's `data` ('@world-train': the bundled world's train split) with its
    `image_root`; --out the YAML's `out`, else ./unike-<model folder name>.pt.
    """
    from mke_plugins.adapters import get_adapter

    from .unike_hparams import UniKETrainingHparams

    hparams = args.load_hparams(UniKETrainingHparams)
    model, tok = args.load_model(hparams)
    records, dataset = args.load_records(args.data or str(hparams.data), adapter=get_adapter(model, hparams),
                                         image_root=args.image_root or hparams.image_root or None)
    base = Path(str(hparams.model_name)).name or "model"
    out = args.out or hparams.out or f"unike-{base}.pt"
    summary = build_archive(hparams, model, tok, records, dataset, out, progress=args.progress)
    print(json.dumps(summary))
    sys.stdout.flush()
    return 0
