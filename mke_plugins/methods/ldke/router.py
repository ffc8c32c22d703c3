"""The Disentanglement Classifier: features, head, calibration, the archive (README, "Algorithm", 9–12).

* **Features** (``features: hidden``): one forward pass with every LDKE delta off, read at the
  residual output of decoder layer ``f``; phi(x) = [LN(mean over image positions); LN(mean over
  text prompt positions); LN(last prompt position)], LN without parameters, image part 0 for
  text-only rows. The pass may stop right after layer ``f``.
* **Head**: u = P phi(x), w = P phi(e) with P = Linear o LayerNorm; ``pair``:
  s = sigmoid(MLP([u; w; |u-w|; u*w])); ``distance`` (ablation): s = sigmoid(b - a ||u-w||^2).
* **Calibration**: tau maximises balanced accuracy between positives and hard negatives on a
  0.05..0.95 grid (ties: the value closest to 0.5).
* **Archive**: a plain dict of tensors, numbers, strings and lists, saved with ``torch.save`` and
  read with ``torch.load(weights_only=True)`` (nothing is unpickled): format version, model
  fingerprint, head, tau, the layer baseline mu, training metadata and validation routing rates.
  An EasyEdit ``MultimodalTrainer`` checkpoint (``{"model": archive, "opt": ...}``) is accepted too.
"""

from __future__ import annotations

import math
import shlex
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mke_hooks import ArchiveError
from mke_plugins.adapters.base import HookPoint, VLMAdapter, unwrap_model
from mke_plugins.core.hooks import HookSet

from .inputs import InputsView

ARCHIVE_FORMAT = "ldke-archive"
ARCHIVE_VERSION = 1
TAU_GRID = tuple(round(0.05 * i, 2) for i in range(1, 20))
TRAIN_COMMAND = "mke-plugins train LDKE --hparams <training yaml> --out <archive>"


# -- features ------------------------------------------------------------------------------

class _StopForward(Exception):
    """Raised by the feature hook to end a forward pass right after layer f."""


@dataclass
class Features:
    """phi(x) for a batch, plus what the exact-match guard compares."""

    phi: torch.Tensor  # (B, 3d) float32
    image_mean: torch.Tensor  # (B, d) float32, pre-LN mean over image positions (0 without image)
    has_image: torch.Tensor  # (B,) bool
    prompt_tokens: list[tuple[int, ...]]
    #: (B, T, d) states at the scope point (the last layer's FFN input) when the lifelong scope asked for them
    scope_states: torch.Tensor | None = None


def _reason(exc: BaseException) -> str:
    """The first sentence of ``exc`` (torch's unreadable-file errors go on for a paragraph)."""
    return str(exc).strip().splitlines()[0].split(". ")[0][:200] if str(exc).strip() else ""


def feature_layer_index(n_layers: int, feature_layer: int | None) -> int:
    f = n_layers // 2 if feature_layer is None else int(feature_layer)
    if not 0 <= f < n_layers:
        raise ArchiveError(f"hparams.feature_layer = {feature_layer} is outside the model's {n_layers} decoder "
                           f"layers; use 0..{n_layers - 1} or null (= {n_layers // 2}).")
    return f


def _phi(states: torch.Tensor, view: InputsView) -> Features:
    h = states.float()
    B, T, d = h.shape
    prompt = view.prompt_mask.to(h.device)[:, :T]
    image = view.image_mask.to(h.device)[:, :T] & prompt
    text = prompt & ~image
    img_n = image.sum(1, keepdim=True)
    txt_n = text.sum(1, keepdim=True)
    img_mean = (h * image.unsqueeze(-1)).sum(1) / img_n.clamp_min(1)
    txt_mean = (h * text.unsqueeze(-1)).sum(1) / txt_n.clamp_min(1)
    idx = torch.arange(T, device=h.device).expand(B, T)
    last = torch.where(prompt, idx, torch.full_like(idx, -1)).max(1).values.clamp_min(0)
    last_state = h[torch.arange(B, device=h.device), last]
    has_image = img_n.squeeze(1) > 0
    img_part = torch.where(has_image.unsqueeze(1), F.layer_norm(img_mean, (d,)), torch.zeros_like(img_mean))
    phi = torch.cat([img_part, F.layer_norm(txt_mean, (d,)), F.layer_norm(last_state, (d,))], dim=1)
    return Features(phi, img_mean, has_image, list(view.prompt_tokens))


def hidden_features(adapter: VLMAdapter, model: nn.Module, view: InputsView, layer: int, *,
                    stop_early: bool = True, scope_point: HookPoint | None = None) -> tuple[Features, Any]:
    """phi for ``view`` from layer ``layer`` of ``model`` (called as given, deltas are the caller's
    business), and with ``scope_point`` the states there too (``Features.scope_states``). Returns
    ``(features, model output)``; the output is ``None`` when stopped early (once every point is read)."""
    captured: dict[str, torch.Tensor] = {}
    wanted = 1 if scope_point is None else 2
    seq = (view.batch_size, int(view.prompt_mask.shape[1]))

    def keep(name: str, x: torch.Tensor) -> None:
        captured.setdefault(name, x)
        if stop_early and len(captured) == wanted:
            raise _StopForward

    output = None
    with HookSet() as hooks:
        hooks.add(HookPoint(adapter.layers(model)[layer].layer, "output"), lambda x: keep("phi", x), seq)
        if scope_point is not None:
            hooks.add(scope_point, lambda x: keep("scope", x), seq)
        try:
            output = view.call(model)
        except _StopForward:
            pass
    if "phi" not in captured:
        raise RuntimeError(f"LDKE features: decoder layer {layer} was not run by the forward pass")
    if scope_point is not None and "scope" not in captured:
        raise RuntimeError("LDKE features: the scope point (the last layer's FFN input) was not run by the forward")

    def seq_view(x: torch.Tensor) -> torch.Tensor:  # flattened (B*T, d) hook tensors
        return x.view(view.batch_size, -1, x.shape[-1]) if x.dim() == 2 else x

    feats = _phi(seq_view(captured["phi"].detach()), view)
    if scope_point is not None:
        feats.scope_states = seq_view(captured["scope"].detach().float())
    return feats, output


# -- head ------------------------------------------------------------------------------------

class RouterHead(nn.Module):
    """s(x, e) from phi(x) and phi(e); ``project`` gives u (or w) for the cosine pre-filter."""

    def __init__(self, in_dim: int, proj_dim: int, hidden: int, kind: str = "pair") -> None:
        super().__init__()
        if kind not in ("pair", "distance"):
            raise ValueError(f"head kind must be 'pair' or 'distance', got {kind!r}")
        self.kind, self.in_dim, self.proj_dim, self.hidden = kind, in_dim, proj_dim, hidden
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, proj_dim)
        if kind == "pair":
            self.mlp = nn.Sequential(nn.Linear(4 * proj_dim, hidden), nn.GELU(), nn.Linear(hidden, 1))
        else:
            self.log_a = nn.Parameter(torch.zeros(()))
            self.b = nn.Parameter(torch.full((), 2.0))

    def project(self, phi: torch.Tensor) -> torch.Tensor:
        return self.proj(self.norm(phi.float()))

    def logit(self, u: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """Pre-sigmoid score for broadcastable ``u`` (..., p) and ``w`` (..., p)."""
        u, w = torch.broadcast_tensors(u, w)
        if self.kind == "pair":
            return self.mlp(torch.cat([u, w, (u - w).abs(), u * w], dim=-1)).squeeze(-1)
        return self.b - F.softplus(self.log_a) * (u - w).pow(2).sum(-1) / math.sqrt(self.proj_dim)

    def forward(self, phi_x: torch.Tensor, phi_e: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(self.logit(self.project(phi_x), self.project(phi_e)))

    def config(self) -> dict[str, Any]:
        return {"kind": self.kind, "in_dim": self.in_dim, "proj_dim": self.proj_dim, "hidden": self.hidden}


# -- calibration ---------------------------------------------------------------------------

def balanced_accuracy(pos: Sequence[float], neg: Sequence[float], tau: float) -> float:
    tpr = sum(1 for s in pos if s >= tau) / max(1, len(pos))
    tnr = sum(1 for s in neg if s < tau) / max(1, len(neg))
    return 0.5 * (tpr + tnr)


def calibrate_threshold(pos: Sequence[float], hard_neg: Sequence[float]) -> tuple[float, float]:
    """``(tau, balanced accuracy)``: the best grid value; among equally good ones, the closest to 0.5
    (the head's own decision point, trained by a logistic-like loss)."""
    if not pos or not hard_neg:
        return 0.5, float("nan")
    scores = [balanced_accuracy(pos, hard_neg, t) for t in TAU_GRID]
    best = max(scores)
    plateau = [t for t, s in zip(TAU_GRID, scores, strict=True) if s == best]
    return min(plateau, key=lambda t: (abs(t - 0.5), t)), best


def rates(pos: Sequence[float], hard: Sequence[float], easy: Sequence[float], tau: float) -> dict[str, float]:
    """Share routed to the edit (s >= tau) per kind."""
    def share(xs: Sequence[float]) -> float | None:
        return sum(1 for s in xs if s >= tau) / len(xs) if xs else None

    return {"positive": share(pos), "hard_negative": share(hard), "easy_negative": share(easy),
            "balanced_accuracy": balanced_accuracy(pos, hard, tau) if pos and hard else None}


# -- archive -----------------------------------------------------------------------------------

def fingerprint(adapter: VLMAdapter, model: nn.Module, feature_layer: int | None, features: str) -> dict[str, Any]:
    """What an archive must match: family, decoder depth L, width d, feature layer f, feature kind."""
    infos = adapter.layers(unwrap_model(model))
    d = int(infos[0].value.weight.shape[0])
    return {"family": adapter.family, "num_layers": len(infos), "hidden_size": d,
            "feature_layer": feature_layer_index(len(infos), feature_layer), "features": features,
            "feature_dim": 3 * d}


def make_archive(head: RouterHead, fp: dict[str, Any], *, tau: float = 0.5, mu: torch.Tensor | None = None,
                 mu_count: int = 0, meta: dict[str, Any] | None = None, val_rates: dict[str, Any] | None = None,
                 loc_prompts: Sequence[str] = ()) -> dict[str, Any]:
    return {
        "format": ARCHIVE_FORMAT, "version": ARCHIVE_VERSION, "fingerprint": dict(fp),
        "head": {**head.config(), "state": {k: v.detach().cpu().clone() for k, v in head.state_dict().items()}},
        "tau": float(tau), "mu": None if mu is None else mu.detach().float().cpu().clone(), "mu_count": int(mu_count),
        "meta": dict(meta or {}), "val_rates": dict(val_rates or {}), "loc_prompts": list(loc_prompts),
    }


def save_archive(archive: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(archive, path)
    return path


def _missing(field: str, detail: str) -> ArchiveError:
    return ArchiveError(f"hparams.{field}: {detail} LDKE needs a trained Disentanglement Classifier: run "
                        f"`{TRAIN_COMMAND}` and set {field} to the file it writes, or set `router: false` with "
                        f"`layer_prior: none` (ablation, no archive needed).")


def rebuild_command(path: str | Path) -> str:
    """The sentence saying how to rebuild the archive at ``path`` (world model, or any model)."""
    out = shlex.quote(str(path))
    return (f"Rebuild it with `mke-plugins train LDKE --hparams world --out {out}` (the bundled world model) or "
            f"`mke-plugins train LDKE --hparams <training yaml> --out {out}` (another model).")


def _damaged(path: str | Path, what: str, field: str) -> ArchiveError:
    return ArchiveError(f"hparams.{field}: LDKE archive {str(path)!r} is damaged: {what}. {rebuild_command(path)}")


def load_archive(path: str | Path | None, *, field: str = "classifier_archive") -> dict[str, Any]:
    """Read an archive (or a MultimodalTrainer checkpoint holding one) without unpickling objects.

    The archive is checked in full here (keys, head config, tensor shapes, finite values), so a
    damaged file fails on load with an :class:`ArchiveError`, never inside a forward pass.
    """
    if not path:
        raise _missing(field, "is not set.")
    p = Path(str(path))
    if not p.is_file():
        raise _missing(field, f"file {str(p)!r} does not exist.")
    try:
        data = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any refusal means the file is not an archive we can trust
        raise ArchiveError(f"hparams.{field}: {str(p)!r} cannot be read as an LDKE archive with "
                           f"torch.load(weights_only=True) ({type(exc).__name__}: {_reason(exc)}): the file is "
                           f"truncated, damaged or not an LDKE archive. {rebuild_command(p)}") from None
    if isinstance(data, dict) and data.get("format") != ARCHIVE_FORMAT and isinstance(data.get("model"), dict):
        data = data["model"]  # EasyEdit MultimodalTrainer checkpoint
    if not isinstance(data, dict) or data.get("format") != ARCHIVE_FORMAT:
        raise ArchiveError(f"hparams.{field}: {str(p)!r} is not an LDKE archive (no format {ARCHIVE_FORMAT!r}). "
                           f"{rebuild_command(p)}")
    if data.get("version") != ARCHIVE_VERSION:
        raise ArchiveError(f"hparams.{field}: {str(p)!r} has archive version {data.get('version')}, this LDKE "
                           f"reads version {ARCHIVE_VERSION}. {rebuild_command(p)}")
    check_archive(data, p, field=field)
    data["path"] = str(p)
    return data


ARCHIVE_KEYS = ("fingerprint", "head", "tau", "mu", "mu_count")
HEAD_KEYS = ("kind", "in_dim", "proj_dim", "hidden", "state")


def check_archive(data: dict[str, Any], path: str | Path, *, field: str = "classifier_archive") -> None:
    """Raise :class:`ArchiveError` unless ``data`` holds every key, a head whose tensors fit its
    config and the fingerprint's features, a 1-D ``mu`` and finite numbers everywhere."""
    missing = [k for k in ARCHIVE_KEYS if k not in data]
    if missing:
        raise _damaged(path, f"it lacks the keys {missing} (a truncated file or another tool's output)", field)
    if not isinstance(data["fingerprint"], dict):
        raise _damaged(path, f"'fingerprint' is a {type(data['fingerprint']).__name__}, expected a dict", field)
    _check_head(data["head"], data["fingerprint"], path, field)
    _check_tau(data["tau"], path, field)
    mu = data["mu"]
    if mu is not None:
        if not isinstance(mu, torch.Tensor) or mu.dim() != 1:
            shape = tuple(mu.shape) if isinstance(mu, torch.Tensor) else type(mu).__name__
            raise _damaged(path, f"tensor 'mu' has shape {shape}, expected one value per decoder layer "
                                 f"({data['fingerprint'].get('num_layers')},)", field)
        _check_finite("'mu'", mu, path, field)


def _check_head(head: Any, fp: dict[str, Any], path: str | Path, field: str) -> None:
    """The head's config is valid and its ``state`` matches a head built from that config."""
    if not isinstance(head, dict) or any(k not in head for k in HEAD_KEYS):
        lacks = [k for k in HEAD_KEYS if not isinstance(head, dict) or k not in head]
        raise _damaged(path, f"'head' lacks {lacks}", field)
    dims = {k: head[k] for k in ("in_dim", "proj_dim", "hidden")}
    if head["kind"] not in ("pair", "distance") or any(not isinstance(v, int) or v < 1 for v in dims.values()):
        raise _damaged(path, f"head config kind={head['kind']!r}, {dims} is invalid (kind 'pair' or 'distance', "
                             f"positive integer sizes)", field)
    if "feature_dim" in fp and head["in_dim"] != fp["feature_dim"]:
        raise _damaged(path, f"head in_dim is {head['in_dim']} but the fingerprint's feature_dim is "
                             f"{fp['feature_dim']}", field)
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in RouterHead(head["in_dim"], head["proj_dim"], head["hidden"],
                                                             head["kind"]).state_dict().items()}
    state = head["state"]
    if not isinstance(state, dict):
        raise _damaged(path, f"head.state is a {type(state).__name__}, expected a dict of tensors", field)
    lost, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    if lost or extra:
        raise _damaged(path, f"head.state does not fit a {head['kind']!r} head: missing {lost}, unexpected {extra}",
                       field)
    for key, shape in expected.items():
        t = state[key]
        name = f"head.state[{key!r}]"
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise _damaged(path, f"tensor {name} has shape {got}, expected {shape} for head config {dims}", field)
        _check_finite(name, t, path, field)


def _check_tau(tau: Any, path: str | Path, field: str) -> None:
    if isinstance(tau, bool) or not isinstance(tau, (int, float)) or not math.isfinite(float(tau)):
        raise _damaged(path, f"the routing threshold tau is {tau!r}, expected a finite number", field)


def _check_finite(name: str, t: torch.Tensor, path: str | Path, field: str) -> None:
    if t.is_floating_point() and not bool(torch.isfinite(t).all()):
        bad = int((~torch.isfinite(t)).sum())
        raise _damaged(path, f"tensor {name} holds NaN or inf values ({bad} of {t.numel()})", field)


def check_fingerprint(archive: dict[str, Any], expected: dict[str, Any], *, field: str = "classifier_archive") -> None:
    got = archive.get("fingerprint", {})
    diffs = [f"{k}: archive {got.get(k)!r}, model/hparams {v!r}" for k, v in expected.items() if got.get(k) != v]
    if diffs:
        raise ArchiveError(f"hparams.{field}: {archive.get('path', 'the archive')!r} was trained for another "
                           f"model or feature setting ({'; '.join(diffs)}). Train one for this model with "
                           f"`{TRAIN_COMMAND}` (matching feature_layer and features).")
    mu, n = archive.get("mu"), expected.get("num_layers")
    if isinstance(mu, torch.Tensor) and n is not None and mu.numel() != n:
        raise _damaged(archive.get("path", "the archive"), f"tensor 'mu' has {mu.numel()} entries, one per decoder "
                                                           f"layer, but the fingerprint and the model have {n} layers",
                       field)


def head_from_archive(archive: dict[str, Any], device: torch.device | str = "cpu") -> RouterHead:
    h = archive["head"]
    head = RouterHead(int(h["in_dim"]), int(h["proj_dim"]), int(h["hidden"]), str(h["kind"]))
    head.load_state_dict(h["state"])
    return head.to(device).eval()


def archive_mu(archive: dict[str, Any] | None, n_layers: int, *, field: str = "classifier_archive") -> torch.Tensor:
    """The layer baseline mu of an archive (an error naming the field if it has none)."""
    mu = None if archive is None else archive.get("mu")
    if mu is None or int(archive.get("mu_count", 0)) == 0:
        where = "no archive is set" if archive is None else f"{archive.get('path')!r} has no layer baseline mu"
        raise ArchiveError(f"hparams.layer_prior is 'archive' but {where}. Build an archive with `{TRAIN_COMMAND}` "
                           f"(it averages mu over prior_edits training edits) and set {field}, or set "
                           f"`layer_prior: none`.")
    if mu.numel() != n_layers:
        raise ArchiveError(f"hparams.{field}: mu has {mu.numel()} layers, the model has {n_layers}.")
    return mu.float()
