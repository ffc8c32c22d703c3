"""UniKE's offline archive (README, "Offline stage" and "Run it"): format, fingerprint, checks, cache.

One file written with ``torch.save``: a dict whose ``"model"`` entry is the payload (other
top-level keys, such as EasyEdit's trainer ``opt`` and ``val_stats``, are ignored). The payload
holds only tensors and plain Python values, so it is read with ``torch.load(weights_only=True)``
and never unpickles arbitrary objects. Every failure raises :class:`UniKEArchiveError` naming the
file and what to do; there is never a random fallback. A file is checked in full when it is read
(keys, every tensor's shape against ``meta``, finite values), so a damaged archive fails on load,
never inside a forward pass.
"""

from __future__ import annotations

import hashlib
import re
import shlex
import weakref
from pathlib import Path
from typing import Any, Iterable, Mapping

import torch
from torch import nn

from mke_hooks import ArchiveError
from mke_plugins.adapters.base import LayerInfo, VLMAdapter, unwrap_model

FORMAT = "mke-unike/1"
BUILD_HINT = ("build it with `mke-plugins train UniKE --hparams world` (or `--hparams <training yaml>` for your "
              "model), or with EasyEdit's MultimodalTrainer and a training YAML with `alg: UniKE` "
              "(its save under results_dir/models/UniKE/ is a valid archive)")
PAYLOAD_KEYS = ("meta", "mu", "bank.h_sem", "bank.h_pos", "bank.h_neg", "bank.ids", "fit.r_pos", "fit.r_neg",
                "zeta", "w_zeta")


class UniKEArchiveError(ArchiveError):
    """The UniKE archive is unset, missing, malformed or built for another model or layer set."""


def _reason(exc: BaseException) -> str:
    """The first sentence of ``exc`` (torch's unreadable-file errors go on for a paragraph)."""
    return str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else ""


def fingerprint(infos: Mapping[int, LayerInfo] | Iterable[LayerInfo]) -> str:
    """SHA-256 over the first 4,096 elements of each layer's key weights, cast to bf16 first.

    The bf16 cast makes fp32 and bf16 copies of one checkpoint agree (EasyEdit's trainer casts
    Qwen-VL models to bf16).
    """
    items = sorted(infos.values() if isinstance(infos, Mapping) else infos, key=lambda i: i.index)
    h = hashlib.sha256()
    for info in items:
        for key in info.keys:
            w = key.weight.detach().reshape(-1)[:4096].to("cpu", torch.bfloat16)
            h.update(str(info.index).encode())
            h.update(w.view(torch.int16).numpy().tobytes())
    return h.hexdigest()


def _norm_text(text: str) -> str:
    return re.sub(r"\s+", "", str(text)).lower()


def record_hash(prompt: str, target: str) -> str:
    """Content hash of a (question, answer) pair, insensitive to whitespace and case.

    Text only, so the CLI (raw records) and EasyEdit's trainer (whose batches only carry the
    record text in ``cond``) compute the same value.
    """
    return hashlib.sha256(f"{_norm_text(prompt)}\x00{_norm_text(target)}".encode()).hexdigest()


def save_archive(payload: dict[str, Any], path: str | Path, extra: Mapping[str, Any] | None = None) -> Path:
    """Write ``{"model": payload, **extra}`` (directories created)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    obj = dict(extra or {})
    obj["model"] = payload
    torch.save(obj, str(path))
    return path


def rebuild_hint(path: str | Path) -> str:
    """The sentence saying how to rebuild the archive at ``path`` (world model, or any model)."""
    out = shlex.quote(str(path))
    return (f"Rebuild it with `mke-plugins train UniKE --hparams world --out {out}` (the bundled world model) or "
            f"`mke-plugins train UniKE --hparams <training yaml> --out {out}` (another model; a save of EasyEdit's "
            f"MultimodalTrainer with `alg: UniKE` is a valid archive too)")


def _damaged(where: str, what: str) -> UniKEArchiveError:
    return UniKEArchiveError(f"UniKE archive {where!r} is damaged: {what}. {rebuild_hint(where)}.")


def read_payload(path: str | Path) -> dict[str, Any]:
    """The payload of an archive file, checked for format, keys, shapes and finite values; errors name the file."""
    p = Path(str(path))
    if not p.is_file():
        raise UniKEArchiveError(f"UniKE archive {str(p)!r} does not exist; {BUILD_HINT}.")
    try:
        obj = torch.load(str(p), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any unreadable file is reported the same way
        raise UniKEArchiveError(f"UniKE archive {str(p)!r} cannot be read with torch.load(weights_only=True) "
                                f"({type(exc).__name__}: {_reason(exc)}): the file is truncated, damaged or not "
                                f"a UniKE archive. {rebuild_hint(p)}.") from None
    payload = obj.get("model") if isinstance(obj, dict) else None
    return check_payload(payload, str(p))


def check_payload(payload: Any, where: str) -> dict[str, Any]:
    """``payload`` if it is a complete, undamaged UniKE payload; else :class:`UniKEArchiveError`."""
    if not isinstance(payload, dict) or not isinstance(payload.get("meta"), dict):
        raise UniKEArchiveError(f"{where}: no UniKE payload (expected a dict with 'model': {{'meta': ...}}); "
                                f"{rebuild_hint(where)}.")
    fmt = payload["meta"].get("format")
    if fmt != FORMAT:
        raise UniKEArchiveError(f"{where}: archive format is {fmt!r}, expected {FORMAT!r}; {rebuild_hint(where)}.")
    missing = [k for k in PAYLOAD_KEYS if k not in payload]
    if missing:
        raise _damaged(where, f"it lacks {missing} (a truncated file or another tool's output)")
    check_tensors(payload, where)
    return payload


def _meta_sizes(meta: Mapping[str, Any], where: str) -> tuple[list[int], int, int]:
    """``(layers, d, d_t)`` from ``meta``, each checked for type and sign."""
    layers, d, d_t = meta.get("layers"), meta.get("d"), meta.get("d_t")
    ok = (isinstance(layers, (list, tuple)) and layers and all(isinstance(layer, int) for layer in layers)
          and all(isinstance(v, int) and v > 0 for v in (d, d_t)))
    if not ok:
        raise _damaged(where, f"meta layers={layers!r}, d={d!r}, d_t={d_t!r} are not a non-empty list of layer "
                              f"indices and two positive integers")
    return [int(layer) for layer in layers], int(d), int(d_t)


def _expected_shapes(payload: Mapping[str, Any], layers: list[int], d: int, d_t: int
                     ) -> dict[str, tuple[int | None, ...]]:
    """Key -> shape (``None``: any size, taken from the tensor itself) of every payload tensor."""
    from .encoders import SemEncoder, TruEncoder

    L = len(layers)
    n, m = _rows(payload.get("bank.h_sem")), _rows(payload.get("fit.r_pos"))
    out: dict[str, tuple[int | None, ...]] = {
        "mu": (L, d), "bank.h_sem": (None, L, d), "bank.h_pos": (n, L, d), "bank.h_neg": (n, L, d),
        "bank.ids": (n,), "fit.r_pos": (None, L, d), "fit.r_neg": (m, L, d), "zeta": (L, d_t), "w_zeta": (L, d, d_t),
    }
    owners = ["shared"] if payload["meta"].get("shared_encoders", False) else [str(layer) for layer in layers]
    with torch.device("meta"):
        parts = {"enc_sem": SemEncoder(d).state_dict(), "enc_tru": TruEncoder(d, d_t).state_dict()}
    for owner in owners:
        for prefix, state in parts.items():
            out.update({f"{prefix}.{owner}.{k}": tuple(v.shape) for k, v in state.items()})
    return out


def _rows(t: Any) -> int | None:
    return int(t.shape[0]) if isinstance(t, torch.Tensor) and t.dim() > 0 else None


def _fits(t: torch.Tensor, shape: tuple[int | None, ...]) -> bool:
    return t.dim() == len(shape) and all(e is None or e == g for e, g in zip(shape, t.shape, strict=True))


def check_tensors(payload: Mapping[str, Any], where: str) -> None:
    """Every tensor the edit reads has the shape ``meta`` implies and only finite values."""
    layers, d, d_t = _meta_sizes(payload["meta"], where)
    sizes = f"meta: layers {layers}, d={d}, d_t={d_t}"
    for key, shape in _expected_shapes(payload, layers, d, d_t).items():
        t = payload.get(key)
        want = "(" + ", ".join("n" if e is None else str(e) for e in shape) + ("," if len(shape) == 1 else "") + ")"
        if t is None:
            raise _damaged(where, f"tensor {key!r} is missing ({sizes})")
        if not isinstance(t, torch.Tensor) or not _fits(t, shape):
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise _damaged(where, f"tensor {key!r} has shape {got}, expected {want} ({sizes})")
        if t.is_floating_point() and not bool(torch.isfinite(t).all()):
            bad = int((~torch.isfinite(t)).sum())
            raise _damaged(where, f"tensor {key!r} holds NaN or inf values ({bad} of {t.numel()})")


class Archive:
    """A loaded, checked archive on one model: encoders and per-layer tensors ready for editing."""

    def __init__(self, payload: dict[str, Any], path: str) -> None:
        self.payload = payload
        self.path = path
        self.meta: dict[str, Any] = payload["meta"]
        self.layers: list[int] = [int(i) for i in self.meta["layers"]]
        self.d = int(self.meta["d"])
        self.d_t = int(self.meta["d_t"])
        self.record_hashes = frozenset(self.meta.get("record_hashes", ()))
        self._sem: dict[int, nn.Module] = {}

    def row(self, layer: int) -> int:
        return self.layers.index(layer)

    def mu(self, layer: int) -> torch.Tensor:
        return self.payload["mu"][self.row(layer)].float()

    def zeta(self, layer: int) -> torch.Tensor:
        return self.payload["zeta"][self.row(layer)].float()

    def w_zeta(self, layer: int) -> torch.Tensor:
        return self.payload["w_zeta"][self.row(layer)].float()

    def bank(self, name: str, layers: list[int]) -> torch.Tensor:
        """``bank.<name>`` restricted to ``layers``: ``[N, len(layers), d]`` (fp16, CPU)."""
        return self.payload[f"bank.{name}"][:, [self.row(layer) for layer in layers]]

    def sem_encoder(self, layer: int, device: torch.device) -> nn.Module:
        """EncSem_l, frozen, fp32, on ``device`` (built once per device)."""
        from .encoders import load_encoders

        key = (layer, str(device))
        if key not in self._sem:
            sem, _ = load_encoders(self.payload, self.meta, only=[layer])
            self._sem[key] = sem[layer].to(device).eval().requires_grad_(False)
        return self._sem[key]

    def check(self, model: nn.Module, adapter: VLMAdapter, layers: list[int]) -> None:
        """Fail unless this archive was built for ``model`` and covers ``layers`` (absolute)."""
        infos = adapter.layers(model)
        n = len(infos)
        if int(self.meta.get("n_layers", n)) != n:
            raise UniKEArchiveError(f"{self.path}: built for a model with {self.meta.get('n_layers')} decoder layers, "
                                    f"this one has {n}; {BUILD_HINT}.")
        d = int(infos[0].value.weight.shape[0])
        if d != self.d:
            raise UniKEArchiveError(f"{self.path}: hidden size d={self.d} in the archive, {d} in the model; "
                                    f"the archive belongs to another model. {BUILD_HINT}.")
        missing = [layer for layer in layers if layer not in self.layers]
        if missing:
            raise UniKEArchiveError(
                f"{self.path}: hparams `layers` resolve to {layers}, but the archive covers only {self.layers} "
                f"(missing {missing}). Fix: set `layers` to a subset of {self.layers}, or rebuild the archive with "
                f"these layers in the training YAML's `layers`.")
        fp = fingerprint([infos[i] for i in self.layers])
        if fp != self.meta.get("fingerprint"):
            raise UniKEArchiveError(
                f"{self.path}: fingerprint mismatch: the archive was built on {self.meta.get('model_name')!r} "
                f"(family {self.meta.get('family')!r}), whose key weights differ from this model's. An archive "
                f"only fits the checkpoint it was built on; {BUILD_HINT}.")


# -- cache: one loaded archive per (path, model) -------------------------------------------------
_CACHE: "weakref.WeakKeyDictionary[nn.Module, dict[str, Archive]]" = weakref.WeakKeyDictionary()


def load_archive(path: str | None, model: nn.Module, adapter: VLMAdapter, layers: list[int]) -> Archive:
    """The checked archive at ``path`` for ``model`` (cached per path and model)."""
    if not path:
        raise UniKEArchiveError(f"hparams `archive` is not set: UniKE needs its offline archive (knowledge bank, "
                                f"encoders, zeta). Set `archive:` to its path; {BUILD_HINT}.")
    base = unwrap_model(model)
    resolved = str(Path(path).expanduser().resolve())
    per_model = _CACHE.setdefault(base, {})
    arch = per_model.get(resolved)
    if arch is None:
        arch = Archive(read_payload(resolved), resolved)
        arch.check(base, adapter, layers)
        per_model[resolved] = arch
    else:
        missing = [layer for layer in layers if layer not in arch.layers]
        if missing:
            arch.check(base, adapter, layers)
    return arch


def check_no_leak(archive_path: str, records: Iterable[Mapping[str, Any]], split: str) -> None:
    """The bench's leak guard: refuse an archive built from the evaluated split or records.

    ``records`` are EasyEdit-style request dicts (``prompt``, ``target``); ``split`` names the
    evaluated split (``"edit"`` for the world's edit split).
    """
    meta = read_payload(archive_path)["meta"]
    if str(meta.get("split")) == str(split):
        raise UniKEArchiveError(f"{archive_path}: built from the {split!r} split, which is the evaluated split; "
                                f"build the archive from the train split.")
    hashes = set(meta.get("record_hashes", ()))
    leaked = [r.get("case_id", i) for i, r in enumerate(records) if record_hash(r["prompt"], r["target"]) in hashes]
    if leaked:
        raise UniKEArchiveError(f"{archive_path}: {len(leaked)} evaluated records (e.g. case {leaked[0]}) were used "
                                f"to build the archive; rebuild it from a split that excludes them.")
