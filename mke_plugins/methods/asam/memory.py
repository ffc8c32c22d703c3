"""ASAM's memory bank M (README, "The memory bank"): FFN-input states of unrelated training-split prompts.

The memory loss keeps each new patch silent on M. M holds, for every edited layer, the FFN-input
states of the *unedited* model at the prompt positions of up to ``memory_size`` prompts read from
``memory_data`` (prompt plus image, no answer: the answer tokens come after the prompt, so with a
causal model they cannot change a prompt position's state).

Where the prompts come from (project decision). ``memory_data`` is an MMEdit-style records JSON
file (image paths relative to ``coco_image``, else to the file's folder) or a folder holding
``train.json`` (the world's layout; ``"@world-data"`` resolves to the bundled world). From every
record the fields in ``memory_fields`` are used: ``src`` with ``image``, ``text_only_prompt`` (no
image), ``image_only_prompt`` with ``image``, ``loc`` (no image), ``m_loc_q`` with ``m_loc``. The
world YAML uses the first three only: they are the training split's own facts, while the world's
``loc`` / ``m_loc_q`` / ``fine_locality`` items name arbitrary other facts and can be edit-split
facts, which the bank must never hold (it would push the patch to stay silent on its own edit).
Paraphrases (``rephrase``) and held-out renderings (``image_rephrase``) are never read.

Caching. A bank is identified by a fingerprint over the model's weights (a cheap digest: per
parameter its name, shape, dtype, full sum and a strided sample), the family, the device type,
the records file's bytes, the fields, ``memory_size``, ``memory_positions``, the layers and the
seed. Banks are kept in memory per model (weakly keyed, so they die with the model; small banks,
up to 64 MB, are also shared by fingerprint across models, e.g. deep copies) and, when
``memory_cache`` names a folder, also on disk as ``asam-bank-<fingerprint>.pt`` (plain tensors,
loadable with ``torch.load(weights_only=True)``). Nothing is ever written inside the package. The
file is written atomically (a temporary file in the same folder, then ``os.replace``), so a crash
or a full disk never leaves a partial bank behind; a cached bank that cannot be read, or whose
layers, widths, dtype or values do not fit the model, is never used: loading it raises an
:class:`~mke_hooks.ArchiveError` that names the file and says to delete it.

The weights digest is computed once per model object and reused while its weights are unchanged
(at 7B a digest is a pass over 8 B parameters; a bench fetches the bank on every edit). Beside the
digest, a per-model record (weakly keyed) holds, for every parameter, its name, a weak reference
to the parameter object, its in-place version counter (``tensor._version``), ``data_ptr()``,
shape, dtype and device; none of these reads a value. The digest is reused exactly when the record
still matches: every in-place write through the parameter or a view or ``detach()`` of it
(``copy_``, ``add_``, ``index_copy_``, ``p[...] = v``, optimiser steps) bumps its version counter;
a swapped module or parameter fails the name/identity check; ``p.data = t`` (which in torch 2.13
keeps the version counter) moves ``data_ptr`` or changes shape/dtype/device. The one caveat: an
in-place write through ``p.data`` (``p.data.add_(1)``) or through memory shared outside torch
(``p.numpy()``) bumps no counter (``.data`` has its own); nothing in this package writes weights
that way, and whoever does must call :func:`clear_cache` (``clear_cache(model)``) afterwards.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import tempfile
import weakref
from collections import OrderedDict
from pathlib import Path
from typing import Any, Sequence

import torch
from torch import nn

from mke_hooks import ArchiveError, HparamsError
from mke_plugins.adapters import Query, VLMAdapter, unwrap_model
from mke_plugins.adapters.images import image_for_family
from mke_plugins.core.hooks import capture

log = logging.getLogger(__name__)

#: record field -> (image field or None, answer fields tried in order for the batch's dummy target)
FIELD_SPECS: dict[str, tuple[str | None, tuple[str, ...]]] = {
    "src": ("image", ("pred", "alt")),
    "text_only_prompt": (None, ("pred", "alt")),
    "image_only_prompt": ("image", ("pred", "alt")),
    "loc": (None, ("loc_ans",)),
    "m_loc_q": ("m_loc", ("m_loc_a",)),
}

Bank = dict[int, torch.Tensor]  # layer index -> (N, d) FFN-input states

_BANKS: "weakref.WeakKeyDictionary[nn.Module, dict[str, Bank]]" = weakref.WeakKeyDictionary()
#: small banks also shared by fingerprint across models (deep copies of one model, the conformance kit):
#: at most this many banks, each at most SHARED_MAX_BYTES, so large models never pin memory after they die
_SHARED: "OrderedDict[str, Bank]" = OrderedDict()
SHARED_SLOTS = 4
SHARED_MAX_BYTES = 64 * 2 ** 20


def _reason(exc: BaseException) -> str:
    """The first sentence of ``exc`` (torch's unreadable-file errors go on for a paragraph)."""
    return str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else ""


def _error(msg: str) -> HparamsError:
    return HparamsError(f"ASAM's memory loss needs training-split prompts: {msg}", key="memory_data",
                        fix="set `memory_data` to a readable records JSON or a folder holding train.json "
                            "('@world-data' for the bundled world), or `lambda_mem: 0` (ablation).")


def records_file(memory_data: str | None) -> Path:
    """The records JSON named by ``memory_data`` (a file, or a folder's ``train.json``)."""
    if not memory_data:
        raise _error("memory_data is not set.")
    p = Path(str(memory_data)).expanduser()
    if p.is_dir():
        p = p / "train.json"
    if not p.is_file():
        raise _error(f"{p} does not exist.")
    return p


def _absent(v: Any) -> bool:
    return v is None or (isinstance(v, (str, list, dict)) and len(v) == 0)


def memory_queries(hparams: Any, adapter: VLMAdapter, raw_bytes: bytes | None = None) -> list[Query]:
    """The bank's prompts as Queries (family-native images), read from ``memory_data``."""
    path = records_file(hparams.memory_data)
    raw_bytes = path.read_bytes() if raw_bytes is None else raw_bytes
    try:
        records = json.loads(raw_bytes)
    except json.JSONDecodeError as exc:
        raise _error(f"{path} is not valid JSON ({exc}).") from None
    if not isinstance(records, list) or not records:
        raise _error(f"{path} must hold a non-empty JSON list of records.")
    root = Path(hparams.coco_image) if getattr(hparams, "coco_image", "") and path.name != "train.json" \
        else path.parent
    images: dict[str, Any] = {}

    def image(rel: str) -> Any:
        if rel not in images:
            f = Path(rel) if Path(rel).is_absolute() else root / rel
            if not f.is_file():
                raise _error(f"image {f} (from {path}) does not exist; check coco_image.")
            images[rel] = image_for_family(adapter, f)
        return images[rel]

    items: list[tuple[str, str | None, str]] = []
    for rec in records:
        if not isinstance(rec, dict):
            continue
        for fld in hparams.memory_fields:
            img_field, answer_fields = FIELD_SPECS[fld]
            prompt = rec.get(fld)
            if _absent(prompt):
                continue
            img = rec.get(img_field) if img_field else None
            if img_field and _absent(img):
                continue
            answer = next((str(rec[a]) for a in answer_fields if not _absent(rec.get(a))), None)
            if answer is None:
                continue
            items.append((str(prompt), img, answer))
    items = list(dict.fromkeys(items))  # the same prompt and picture once
    if not items:
        raise _error(f"{path} has no usable prompts in fields {list(hparams.memory_fields)}.")
    if len(items) > int(hparams.memory_size):
        gen = torch.Generator().manual_seed(int(hparams.seed))
        keep = sorted(torch.randperm(len(items), generator=gen)[: int(hparams.memory_size)].tolist())
        items = [items[i] for i in keep]
    return [Query(image(img) if img else None, prompt, answer) for prompt, img, answer in items]


#: per model: (parameter record, digest) of its last weights digest (module docstring)
_DIGESTS: "weakref.WeakKeyDictionary[nn.Module, tuple[list[tuple[Any, ...]], str]]" = weakref.WeakKeyDictionary()


def _param_record(model: nn.Module) -> list[tuple[Any, ...]]:
    """Per parameter: name, a weak reference to it, version counter, data pointer, shape, dtype and device."""
    return [(name, weakref.ref(p), p._version, p.data_ptr(), tuple(p.shape), p.dtype, p.device)
            for name, p in model.named_parameters()]


def _unchanged(model: nn.Module, record: list[tuple[Any, ...]]) -> bool:
    params = list(model.named_parameters())
    if len(params) != len(record):
        return False
    for (name, p), (r_name, r_ref, version, ptr, shape, dtype, device) in zip(params, record, strict=True):
        if name != r_name or r_ref() is not p or p._version != version or p.data_ptr() != ptr \
                or tuple(p.shape) != shape or p.dtype != dtype or p.device != device:
            return False
    return True


def model_digest(model: nn.Module) -> str:
    """:func:`weights_digest` of ``model``, computed once and reused while its weights are unchanged."""
    base = unwrap_model(model)
    cached = _DIGESTS.get(base)
    if cached is not None and _unchanged(base, cached[0]):
        return cached[1]
    record = _param_record(base)
    digest = weights_digest(base)
    _DIGESTS[base] = (record, digest)
    return digest


def weights_digest(model: nn.Module) -> str:
    """A cheap fingerprint of the weights: per parameter its name, shape, dtype, sum and a strided sample."""
    h = hashlib.sha256()
    with torch.no_grad():
        for name, p in unwrap_model(model).named_parameters():
            flat = p.detach().reshape(-1)
            step = max(1, flat.numel() // 1024)
            sample = flat[::step][:1024].float().cpu()
            h.update(f"{name}|{tuple(p.shape)}|{p.dtype}".encode())
            h.update(struct.pack("<d", float(flat.sum(dtype=torch.float32))))
            h.update(sample.numpy().tobytes())
    return h.hexdigest()


def fingerprint(model: nn.Module, adapter: VLMAdapter, hparams: Any, layers: Sequence[int], data: bytes) -> str:
    """The bank's identity (see the module docstring)."""
    device = next(unwrap_model(model).parameters()).device.type
    h = hashlib.sha256()
    h.update(model_digest(model).encode())
    h.update(hashlib.sha256(data).hexdigest().encode())
    h.update(json.dumps([adapter.family, device, list(hparams.memory_fields), int(hparams.memory_size),
                         hparams.memory_positions, sorted(int(x) for x in layers), int(hparams.seed)]).encode())
    return h.hexdigest()[:24]


def position_mask(prompt_mask: torch.Tensor, positions: int | str, gen: torch.Generator) -> torch.Tensor:
    """(B, T) bool: every prompt position ('all'), or the last one plus N-1 random others per row."""
    if positions == "all":
        return prompt_mask.clone()
    out = torch.zeros_like(prompt_mask)
    for b in range(prompt_mask.shape[0]):
        idx = prompt_mask[b].nonzero().flatten().cpu()
        if idx.numel() == 0:
            continue
        last, others = idx[-1:], idx[:-1]
        k = min(int(positions) - 1, others.numel())
        pick = others[torch.randperm(others.numel(), generator=gen)[:k]] if k > 0 else others[:0]
        out[b, torch.cat([last, pick]).to(out.device)] = True
    return out


def ffn_states(model: nn.Module, tok: Any, adapter: VLMAdapter, queries: Sequence[Query], layers: Sequence[int],
               *, positions: int | str = "all", batch_size: int = 32, seed: int = 0,
               dtype: torch.dtype | dict[int, torch.dtype] | None = None, progress: bool = False) -> Bank:
    """FFN-input states at the prompt positions of ``queries`` under the model as it is called (no gradient).

    Each layer's states stay on that layer's device; ``dtype`` casts them (one dtype, or one per
    layer as :func:`bank_dtypes` gives; ``None`` keeps the layer's own).
    """
    infos = adapter.layers(model)
    gen = torch.Generator().manual_seed(int(seed))
    out: dict[int, list[torch.Tensor]] = {layer: [] for layer in layers}
    starts = range(0, len(queries), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="ASAM memory bank", unit="batch", leave=False)
    with torch.no_grad():
        for s in starts:
            batch = adapter.batch(model, tok, list(queries[s:s + batch_size]))
            mask = position_mask(batch.prompt_mask, positions, gen)
            with capture({layer: infos[layer].ffn_in for layer in layers}, positions=mask) as rec:
                adapter.forward(model, batch)
            for layer in layers:
                v = rec[layer]
                want = dtype.get(layer) if isinstance(dtype, dict) else dtype
                out[layer].append(v.to(want) if want is not None else v)
    return {layer: torch.cat(v, dim=0) for layer, v in out.items()}


def bank_dtype(model_or_weight: nn.Module | torch.Tensor) -> torch.dtype:
    """fp32 beside fp32 weights; fp16 beside half-precision (bf16/fp16) ones (README, "Device and dtype").

    A tensor: that weight's; a model: its first floating parameter's (see :func:`bank_dtypes` for
    the per-layer rule edits use).
    """
    params = [model_or_weight] if isinstance(model_or_weight, torch.Tensor) else \
        unwrap_model(model_or_weight).parameters()
    for p in params:
        if p.is_floating_point():
            return torch.float16 if p.dtype in (torch.float16, torch.bfloat16) else torch.float32
    return torch.float32


def bank_dtypes(model: nn.Module, adapter: VLMAdapter, layers: Sequence[int]) -> dict[int, torch.dtype]:
    """Per edited layer, the bank dtype beside its value matrix (a model may mix dtypes across layers)."""
    infos = adapter.layers(model)
    return {int(layer): bank_dtype(infos[layer].value.weight) for layer in layers}


def _beside_layers(bank: Bank, model: nn.Module, adapter: VLMAdapter) -> bool:
    infos = adapter.layers(model)
    return all(v.device == infos[layer].value.weight.device for layer, v in bank.items())


def get_bank(model: nn.Module, tok: Any, adapter: VLMAdapter, hparams: Any, layers: Sequence[int]
             ) -> tuple[Bank, str, str]:
    """``(bank, fingerprint, source)`` for the layers, from memory, disk or a fresh build (source says which)."""
    base = unwrap_model(model)
    data = records_file(hparams.memory_data).read_bytes()
    fp = fingerprint(base, adapter, hparams, layers, data)
    per_model = _BANKS.setdefault(base, {})
    if fp in per_model:
        return per_model[fp], fp, "memory"
    shared = _SHARED.get(fp)
    if shared is not None and _beside_layers(shared, base, adapter):  # each layer's states beside its layer
        _SHARED.move_to_end(fp)
        per_model[fp] = shared
        return shared, fp, "memory"
    cache_file = Path(hparams.memory_cache).expanduser() / f"asam-bank-{fp}.pt" if hparams.memory_cache else None
    if cache_file is not None and cache_file.is_file():
        bank = load_cached_bank(cache_file, base, adapter, layers)
        per_model[fp] = bank
        _share(fp, bank)
        return bank, fp, "disk"
    queries = memory_queries(hparams, adapter, data)
    bank = ffn_states(base, tok, adapter, queries, layers, positions=hparams.memory_positions,
                      batch_size=int(hparams.memory_batch), seed=int(hparams.seed),
                      dtype=bank_dtypes(base, adapter, layers),
                      progress=len(queries) > 64 * int(hparams.memory_batch))
    log.info("ASAM: built memory bank %s from %d prompts (%s states per layer)", fp, len(queries),
             {layer: int(v.shape[0]) for layer, v in bank.items()})
    per_model[fp] = bank
    _share(fp, bank)
    if cache_file is not None:
        save_cached_bank(bank, cache_file)
    return bank, fp, "built"


def _bad_cache(path: Path, what: str) -> ArchiveError:
    return ArchiveError(f"ASAM memory cache {str(path)!r} {what}. Delete {path}: ASAM rebuilds the bank from "
                        f"memory_data on the next edit (or set `memory_cache: null` to keep banks in memory only).")


def load_cached_bank(path: Path, model: nn.Module, adapter: VLMAdapter, layers: Sequence[int]) -> Bank:
    """The bank cached in ``path``, checked against the model and layers; never a damaged one.

    Each layer's states are put on that layer's device (a model spread over several GPUs).
    """
    try:
        loaded = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise _bad_cache(path, f"cannot be read with torch.load(weights_only=True) ({type(exc).__name__}: "
                               f"{_reason(exc)}): it is truncated or damaged") from None
    if not isinstance(loaded, dict):
        raise _bad_cache(path, f"holds a {type(loaded).__name__}, not a dict of layer index -> states")
    try:
        bank = {int(k): v for k, v in loaded.items()}
    except (TypeError, ValueError):
        raise _bad_cache(path, f"has keys {list(loaded)[:8]}, not layer indices") from None
    check_bank(bank, path, model, adapter, layers)
    infos = adapter.layers(model)
    return {layer: v.to(infos[layer].value.weight.device) for layer, v in bank.items()}


def check_bank(bank: Bank, path: Path, model: nn.Module, adapter: VLMAdapter, layers: Sequence[int]) -> None:
    """Raise unless ``bank`` holds exactly ``layers``, each an (n, d) finite tensor of the bank dtype."""
    if sorted(bank) != sorted(int(layer) for layer in layers):
        raise _bad_cache(path, f"holds layers {sorted(bank)}, but this edit needs layers {sorted(layers)}")
    infos = adapter.layers(model)
    for layer, v in bank.items():
        dtype = bank_dtype(infos[layer].value.weight)
        d = int(infos[layer].value.weight.shape[0])
        if not isinstance(v, torch.Tensor) or v.dim() != 2 or v.shape[1] != d:
            got = tuple(v.shape) if isinstance(v, torch.Tensor) else type(v).__name__
            raise _bad_cache(path, f"layer {layer} states have shape {got}, expected (n, {d}) (rows of width {d}, "
                                   f"the model's hidden size)")
        if v.dtype != dtype:
            raise _bad_cache(path, f"layer {layer} states are {v.dtype}, expected {dtype} for this model")
        if not bool(torch.isfinite(v).all()):
            raise _bad_cache(path, f"layer {layer} states hold NaN or inf values")


def save_cached_bank(bank: Bank, path: Path) -> None:
    """Write ``bank`` to ``path`` atomically: a temporary file in the same folder, synced, then
    ``os.replace``; on any failure the temporary file is removed and ``path`` is left as it was."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            torch.save({str(k): v.cpu() for k, v in bank.items()}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _share(fp: str, bank: Bank) -> None:
    if sum(v.numel() * v.element_size() for v in bank.values()) > SHARED_MAX_BYTES:
        return
    _SHARED[fp] = bank
    _SHARED.move_to_end(fp)
    while len(_SHARED) > SHARED_SLOTS:
        _SHARED.popitem(last=False)


def clear_cache(model: nn.Module | None = None) -> None:
    """Forget in-memory banks and weights digests (of one model, or all, the shared banks included)."""
    if model is None:
        _BANKS.clear()
        _SHARED.clear()
        _DIGESTS.clear()
    else:
        _BANKS.pop(unwrap_model(model), None)
        _DIGESTS.pop(unwrap_model(model), None)
