"""UniKE's offline stage (README, "Offline stage"): one implementation behind both drivers.

:class:`UniKEOffline` holds the whole stage; the CLI (``unike_train.py``) and EasyEdit's
``MultimodalTrainer`` (``trainable.py``) call only its public functions:

* :meth:`~UniKEOffline.observe` — steps 1–2 on any teacher-forced :class:`Batch`: one forward
  pass with the target (A_pos), the model's own teacher-forced argmax as A_neg (a triplet is
  skipped when it equals the target), one more forward pass with A_neg in place of the target;
  FFN-input states h_sem / h_pos / h_neg at every banked layer, the running mean μ_l, and for
  up to ``zeta_fit_size`` triplets the layer's output residual state at both final positions;
* :meth:`~UniKEOffline.loss` — step 4 (truthfulness and semantic contrastive losses), the
  batch filled up to ``enc_batch_size`` with states replayed from the bank;
* :meth:`~UniKEOffline.evaluate` — held-out ``sep_acc`` and ``sem_r1``;
* :meth:`~UniKEOffline.payload` — step 6 (ζ, the ridge decoder W_ζ) and the archive meta;
* :meth:`~UniKEOffline.save` / :meth:`~UniKEOffline.load` (and ``load_payload`` to resume).

The model is frozen and never modified: states are read with forward hooks through the adapter,
under ``no_grad``. Only the encoders train (fp32). The bank lives on CPU in fp16.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mke_plugins.adapters import get_adapter
from mke_plugins.adapters.base import (
    Batch,
    HookPoint,
    VLMAdapter,
    model_device,
    model_dtype,
    resolve_layers,
    unwrap_model,
)
from mke_plugins.core.hooks import capture

from .archive import FORMAT, UniKEArchiveError, fingerprint, read_payload, save_archive
from .encoders import build_encoders, encoder_state, load_encoder_state
from .unike_hparams import UniKETrainingHparams

TOOL = "mke-plugins UniKE offline"


@dataclass
class States:
    """Usable triplets of one observed batch: ``[n, L, d]`` fp32 tensors on the encoders' device."""

    h_sem: torch.Tensor
    h_pos: torch.Tensor
    h_neg: torch.Tensor
    rows: int = 0  # rows in the observed batch
    skipped: int = 0  # rows whose prediction already equals the target
    added: int = 0  # triplets newly added to the bank

    def __len__(self) -> int:
        return int(self.h_sem.shape[0])


class _Growing:
    """A CPU tensor ``[n, *shape]`` that grows by doubling (fast appends, cheap replay)."""

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype) -> None:
        self.shape, self.dtype = shape, dtype
        self.data = torch.empty((0, *shape), dtype=dtype)
        self.n = 0

    def append(self, x: torch.Tensor) -> None:
        if self.n == self.data.shape[0]:
            grown = torch.empty((max(16, 2 * self.n), *self.shape), dtype=self.dtype)
            grown[:self.n] = self.data[:self.n]
            self.data = grown
        self.data[self.n] = x.to("cpu", self.dtype)
        self.n += 1

    def set(self, t: torch.Tensor) -> None:
        self.data = t.to("cpu", self.dtype).clone()
        self.n = int(t.shape[0])

    @property
    def view(self) -> torch.Tensor:
        return self.data[:self.n]


def _row_hashes(batch: Batch) -> list[str]:
    """Per-row content hashes of a batch (token ids, labels, and the batch's image tensors)."""
    inputs = batch.inputs.get("samples", batch.inputs)
    extra = hashlib.sha256()
    items = inputs if isinstance(inputs, list) else [inputs]
    for item in items:
        for k in sorted(item):
            v = item[k]
            if torch.is_tensor(v) and v.is_floating_point():
                extra.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
            elif isinstance(v, list) and v and isinstance(v[0], str):
                extra.update("\x00".join(v).encode())
    common = extra.hexdigest()
    out = []
    for b in range(len(batch)):
        h = hashlib.sha256(common.encode())
        ids = batch.inputs.get("input_ids")
        if torch.is_tensor(ids):
            h.update(ids[b][batch.attention_mask[b].bool()].cpu().numpy().tobytes())
        h.update(batch.labels[b].cpu().numpy().tobytes())
        h.update(str(b).encode() if ids is None else b"")
        out.append(h.hexdigest())
    return out


def supcon_loss(z: torch.Tensor, labels: torch.Tensor, tau: float) -> torch.Tensor:
    """Supervised contrastive loss per anchor (paper Eq. 4), self-pair removed from both sums."""
    z = F.normalize(z, dim=-1)
    s = z @ z.T / tau
    eye = torch.eye(len(z), dtype=torch.bool, device=z.device)
    s = s.masked_fill(eye, float("-inf"))
    same = (labels[:, None] == labels[None, :]) & ~eye
    num = torch.logsumexp(s.masked_fill(~same, float("-inf")), dim=1)
    den = torch.logsumexp(s, dim=1)
    ok = same.any(1)
    return (den - num)[ok]


def centred_cos(a: torch.Tensor, b: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """cos_μ(a_i, b_j) for every pair: ``[len(a), len(b)]``."""
    return F.normalize(a - mu, dim=-1) @ F.normalize(b - mu, dim=-1).T


def semantic_loss(h_sem: torch.Tensor, e: torch.Tensor, mu: torch.Tensor, tau: float) -> torch.Tensor:
    """Paper Eq. 5 per anchor: raw h_sem_i against EncSem(h_pos_i), EncSem(h_neg_i) over all 2n outputs."""
    n = len(h_sem)
    s = centred_cos(h_sem, e, mu) / tau  # [n, 2n]
    idx = torch.arange(n, device=h_sem.device)
    pos = torch.full_like(s, float("-inf"))
    pos[idx, idx] = s[idx, idx]
    pos[idx, idx + n] = s[idx, idx + n]
    return torch.logsumexp(s, dim=1) - torch.logsumexp(pos, dim=1)


class UniKEOffline(nn.Module):
    """The offline stage on one frozen model: bank, μ, encoders, ζ and W_ζ (README, "Offline stage")."""

    def __init__(self, model: nn.Module, tok: Any, hparams: UniKETrainingHparams,
                 adapter: VLMAdapter | None = None, *, dataset: str = "", split: str = "train") -> None:
        super().__init__()
        base = unwrap_model(model)
        self._model = [base]  # not a submodule: the encoders are the only parameters here
        self.tok = tok
        self.hparams = hparams
        self.adapter = adapter or get_adapter(base, hparams)
        infos = self.adapter.layers(base)
        self.n_layers = len(infos)
        self.layers = resolve_layers(hparams.layers, self.n_layers)
        self.infos = {layer: infos[layer] for layer in self.layers}
        self.d = int(infos[0].value.weight.shape[0])
        self.d_t = int(hparams.tru_dim or self.d)
        self.dataset, self.split = dataset, split
        torch.manual_seed(int(hparams.seed))
        self.enc_sem, self.enc_tru = build_encoders(self.layers, self.d, self.d_t, bool(hparams.shared_encoders))
        self.to(model_device(base))
        L = len(self.layers)
        self.bank = {k: _Growing((L, self.d), torch.float16) for k in ("h_sem", "h_pos", "h_neg")}
        self.ids: list[int] = []
        self.fit = {k: _Growing((L, self.d), torch.float16) for k in ("r_pos", "r_neg")}
        self.mu_sum = torch.zeros(L, self.d, dtype=torch.float64)
        self.mu_count = 0
        self.seen_rows: set[str] = set()
        self.banked: set[int] = set()  # bank.ids of the banked triplets
        self.record_hashes: list[str] = []
        self.n_triplets = 0
        self.n_skipped = 0
        self.replay_exclude: torch.Tensor | None = None  # bank rows never replayed (CLI holdout)
        self.gen = torch.Generator().manual_seed(int(hparams.seed))
        self.state_dtype = str(model_dtype(base)).replace("torch.", "")

    # -- plumbing -------------------------------------------------------------------------------
    @property
    def model(self) -> nn.Module:
        return self._model[0]

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def bank_size(self) -> int:
        return self.bank["h_sem"].n

    def encoder_parameters(self) -> list[nn.Parameter]:
        seen, out = set(), []
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                out.append(p)
        return out

    def mu(self, states: States | None = None) -> torch.Tensor:
        """μ ``[L, d]`` fp32 on the encoders' device (the batch mean before anything is banked)."""
        if self.mu_count == 0:
            if states is None or len(states) == 0:
                return torch.zeros(len(self.layers), self.d, device=self.device)
            return torch.cat([states.h_sem, states.h_pos], 0).mean(0)
        return (self.mu_sum / self.mu_count).float().to(self.device)

    # -- steps 1-2 ------------------------------------------------------------------------------
    def _points(self, batch: Batch) -> dict[Any, HookPoint]:
        pts: dict[Any, HookPoint] = {}
        for layer, info in self.infos.items():
            pts[("in", layer)] = info.ffn_in
            pts[("out", layer)] = HookPoint(info.layer, "output")
        return pts

    def _run(self, batch: Batch) -> tuple[torch.Tensor, dict[Any, torch.Tensor]]:
        with torch.no_grad(), capture(self._points(batch), seq_shape=tuple(batch.labels.shape)) as rec:
            logits = self.adapter.forward(self.model, batch)
        return logits, {k: rec[k].to(self.device) for k in rec.calls}  # every layer's states beside the encoders

    def _neg_batch(self, batch: Batch, preds: list[list[int]]) -> Batch:
        """The batch with each row's target tokens replaced by the model's teacher-forced prediction."""
        ids = batch.inputs.get("input_ids")
        if torch.is_tensor(ids) and tuple(ids.shape) == tuple(batch.labels.shape):
            new_ids = ids.clone()
            labels = batch.labels.clone()
            for b, (pos, p) in enumerate(zip(batch.answer_positions(), preds, strict=False)):
                at = torch.tensor(pos, device=ids.device) + 1
                new_ids[b, at] = torch.tensor(p, device=ids.device, dtype=ids.dtype)
                labels[b, at] = torch.tensor(p, device=labels.device, dtype=labels.dtype)
            return Batch(inputs=dict(batch.inputs, input_ids=new_ids), labels=labels,
                         attention_mask=batch.attention_mask, image_mask=batch.image_mask, queries=batch.queries)
        # LAVIS-style wrappers tokenise text themselves: rebuild the rows from their queries
        if not batch.queries:
            raise ValueError("UniKE offline: a batch without input_ids needs its queries to build A_neg")
        from mke_plugins.adapters.base import Query

        lm_tok = self.adapter.lm_tokenizer(self.model, self.tok)
        queries = [Query(q.image, q.prompt, lm_tok.decode(p).strip() or q.target)
                   for q, p in zip(batch.queries, preds, strict=False)]
        return self.adapter.batch(self.model, self.tok, queries)

    @staticmethod
    def _last_target(batch: Batch) -> list[int]:
        tm = batch.target_mask
        return [int(row.nonzero().max()) for row in tm]

    def observe(self, batch: Batch, add_to_bank: bool, hashes: Sequence[str] | None = None,
                record_hashes: Sequence[str | None] | None = None) -> States:
        """Steps 1–2 on a teacher-forced batch; new rows join the bank when ``add_to_bank``.

        ``hashes`` are per-row content hashes (computed from the tensors when omitted);
        ``record_hashes`` the (question, answer) hashes recorded in the archive meta.
        """
        hashes = list(hashes) if hashes is not None else _row_hashes(batch)
        logits, st = self._run(batch)
        answer = batch.answer_positions()
        preds, keep = [], []
        for b, pos in enumerate(answer):
            if not pos:
                preds.append([])
                continue
            p = logits[b, pos].argmax(-1).tolist()
            tgt = batch.labels[b, [q + 1 for q in pos]].tolist()
            preds.append(p)
            if p != tgt:
                keep.append(b)
        skipped = sum(1 for b, pos in enumerate(answer) if pos and b not in keep)
        L = len(self.layers)
        empty = torch.zeros(0, L, self.d, device=self.device)
        if add_to_bank:
            for b, h in enumerate(hashes):
                if h not in self.seen_rows:
                    self.seen_rows.add(h)
                    m = batch.attention_mask[b].bool()
                    for j, layer in enumerate(self.layers):
                        self.mu_sum[j] += st[("in", layer)][b][m.to(st[("in", layer)].device)].double().sum(0).cpu()
                    self.mu_count += int(m.sum())
        if not keep:
            self.n_skipped += skipped if add_to_bank else 0
            return States(empty, empty, empty, rows=len(batch), skipped=skipped)
        neg = self._neg_batch(batch, [preds[b] if preds[b] else [] for b in range(len(batch))])
        _, st_neg = self._run(neg)
        last_pos, last_neg = self._last_target(batch), self._last_target(neg)
        sem = torch.stack([torch.stack([st[("in", layer)][b, answer[b][0]] for layer in self.layers]) for b in keep])
        pos = torch.stack([torch.stack([st[("in", layer)][b, last_pos[b]] for layer in self.layers]) for b in keep])
        ngs = torch.stack([torch.stack([st_neg[("in", layer)][b, last_neg[b]] for layer in self.layers]) for b in keep])
        r_pos = torch.stack([torch.stack([st[("out", layer)][b, last_pos[b]] for layer in self.layers]) for b in keep])
        r_neg = torch.stack([torch.stack([st_neg[("out", layer)][b, last_neg[b]] for layer in self.layers])
                             for b in keep])
        added = 0
        if add_to_bank:
            self.n_skipped += skipped
            cap = int(self.hparams.zeta_fit_size) if self.hparams.zeta_fit_size is not None else None
            for i, b in enumerate(keep):
                tid = int.from_bytes(bytes.fromhex(hashes[b][:16]), "big", signed=True)
                if tid in self.banked or self.bank_size >= int(self.hparams.bank_size):
                    continue
                self.banked.add(tid)
                for name, t in (("h_sem", sem), ("h_pos", pos), ("h_neg", ngs)):
                    self.bank[name].append(t[i].float())
                self.ids.append(tid)
                if record_hashes is not None and record_hashes[b]:
                    self.record_hashes.append(str(record_hashes[b]))
                if cap is None or self.fit["r_pos"].n < cap:
                    self.fit["r_pos"].append(r_pos[i].float())
                    self.fit["r_neg"].append(r_neg[i].float())
                self.n_triplets += 1
                added += 1
        dev = self.device
        return States(sem.float().to(dev), pos.float().to(dev), ngs.float().to(dev), rows=len(batch),
                      skipped=skipped, added=added)

    # -- step 4 ---------------------------------------------------------------------------------
    def _replay(self, n: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        size = self.bank_size
        if n <= 0 or size == 0:
            return None
        pool = torch.arange(size)
        if self.replay_exclude is not None and len(self.replay_exclude):
            keep = torch.ones(size, dtype=torch.bool)
            keep[self.replay_exclude[self.replay_exclude < size]] = False
            pool = pool[keep]
        if len(pool) == 0:
            return None
        idx = pool[torch.randint(len(pool), (min(n, len(pool)),), generator=self.gen)]
        dev = self.device
        return tuple(self.bank[k].view[idx].float().to(dev) for k in ("h_sem", "h_pos", "h_neg"))  # type: ignore

    def _filled(self, states: States) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        hs, hp, hn = states.h_sem, states.h_pos, states.h_neg
        extra = self._replay(int(self.hparams.enc_batch_size) - len(states))
        if extra is not None:
            hs, hp, hn = (torch.cat([a, b], 0) for a, b in zip((hs, hp, hn), extra, strict=True))
        return hs, hp, hn

    def loss(self, states: States) -> tuple[torch.Tensor, dict[str, float]]:
        """L = Σ_layers mean(L1) + mean(L2), on the batch filled up to ``enc_batch_size`` by replay."""
        params = self.encoder_parameters()
        if len(states) == 0:
            zero = sum(p.sum() for p in params) * 0.0
            return zero, {"unike/l_tru": 0.0, "unike/l_sem": 0.0}
        hs, hp, hn = self._filled(states)
        m = len(hs)
        mu = self.mu(states)
        labels = torch.cat([torch.ones(m), torch.zeros(m)]).to(hs.device)
        total = hs.new_zeros(())
        l_tru = l_sem = 0.0
        for j, layer in enumerate(self.layers):
            both = torch.cat([hp[:, j], hn[:, j]], 0)
            z = self.enc_tru[str(layer)](both)
            l1 = supcon_loss(z, labels, float(self.hparams.tau)).mean()
            e = self.enc_sem[str(layer)](both)
            l2 = semantic_loss(hs[:, j], e, mu[j], float(self.hparams.tau)).mean()
            total = total + l1 + l2
            l_tru += float(l1.detach())
            l_sem += float(l2.detach())
        return total, {"unike/l_tru": l_tru, "unike/l_sem": l_sem}

    # -- held-out scores ------------------------------------------------------------------------
    @torch.no_grad()
    def centroids(self, idx: torch.Tensor | None = None, chunk: int = 1024) -> torch.Tensor:
        """``[L, 2, d_t]`` truthfulness-space centroids (pos, neg) of the bank rows ``idx`` (default: all)."""
        idx = torch.arange(self.bank_size) if idx is None else idx
        L = len(self.layers)
        acc = torch.zeros(L, 2, self.d_t, device=self.device)
        for s in range(0, len(idx), chunk):
            part = idx[s:s + chunk]
            for k, name in enumerate(("h_pos", "h_neg")):
                h = self.bank[name].view[part].float().to(self.device)
                for j, layer in enumerate(self.layers):
                    acc[j, k] += self.enc_tru[str(layer)](h[:, j]).sum(0)
        return acc / max(1, len(idx))

    @torch.no_grad()
    def evaluate(self, states: States, centroids: torch.Tensor | None = None) -> dict[str, float]:
        """``unike/sep_acc`` and ``unike/sem_r1`` of ``states`` (held out or fresh).

        Centroids default to the replayed part of the filled batch; sem_r1 ranks each row's own
        EncSem(h_pos) among every EncSem(h_pos) of the filled batch.
        """
        n = len(states)
        if n == 0:
            return {"unike/sep_acc": float("nan"), "unike/sem_r1": float("nan")}
        hs, hp, hn = self._filled(states)
        mu = self.mu(states)
        sep, r1 = 0.0, 0.0
        for j, layer in enumerate(self.layers):
            tru = self.enc_tru[str(layer)]
            if centroids is not None:
                c = centroids[j]
            else:
                ref_p, ref_n = (hp[n:], hn[n:]) if len(hp) > n else (hp, hn)
                c = torch.stack([tru(ref_p[:, j]).mean(0), tru(ref_n[:, j]).mean(0)])
            for k, h in enumerate((hp[:n, j], hn[:n, j])):
                z = F.normalize(tru(h), dim=-1) @ F.normalize(c, dim=-1).T
                sep += float((z.argmax(-1) == k).float().mean()) / 2
            e = self.enc_sem[str(layer)](hp[:, j])
            sim = centred_cos(hs[:n, j], e, mu[j])
            r1 += float((sim.argmax(-1) == torch.arange(n, device=sim.device)).float().mean())
        L = len(self.layers)
        return {"unike/sep_acc": sep / L, "unike/sem_r1": r1 / L}

    def bank_states(self, idx: torch.Tensor) -> States:
        """Bank rows ``idx`` as :class:`States` (CLI epochs over the cached bank)."""
        dev = self.device
        h = [self.bank[k].view[idx].float().to(dev) for k in ("h_sem", "h_pos", "h_neg")]
        return States(*h, rows=len(idx))

    # -- step 6 and the archive -----------------------------------------------------------------
    @torch.no_grad()
    def zeta_and_decoder(self) -> tuple[torch.Tensor, torch.Tensor]:
        """ζ ``[L, d_t]`` over the whole bank and W_ζ ``[L, d, d_t]`` (ridge decoder to output residuals)."""
        L = len(self.layers)
        if self.bank_size == 0:
            raise UniKEArchiveError("UniKE offline: the bank is empty (every triplet was skipped or no data was "
                                    "observed); the archive cannot be built. Check the data split and `layers`.")
        c = self.centroids()
        zeta = (c[:, 0] - c[:, 1]).cpu()
        w = torch.zeros(L, self.d, self.d_t)
        n_fit = self.fit["r_pos"].n
        lam = float(self.hparams.ridge)
        for j, layer in enumerate(self.layers):
            tru = self.enc_tru[str(layer)]
            x = torch.cat([tru(self.bank[k].view[:n_fit, j].float().to(self.device)) for k in ("h_pos", "h_neg")])
            y = torch.cat([self.fit[k].view[:, j].float().to(self.device) for k in ("r_pos", "r_neg")])
            x = x.double() - x.double().mean(0)
            y = y.double() - y.double().mean(0)
            gram = x.T @ x / len(x) + lam * torch.eye(self.d_t, dtype=torch.float64, device=x.device)
            w[j] = torch.linalg.solve(gram, x.T @ y / len(x)).T.float().cpu()
        return zeta, w

    def meta(self) -> dict[str, Any]:
        base = self.model
        name = getattr(self.hparams, "model_name", "")
        name = name if isinstance(name, str) else getattr(getattr(base, "config", None), "_name_or_path", "")
        return {
            "format": FORMAT, "layers": list(self.layers), "d": self.d, "d_t": self.d_t,
            "tau": float(self.hparams.tau), "family": self.adapter.family, "model_name": str(name),
            "n_layers": self.n_layers, "fingerprint": fingerprint(self.infos), "state_dtype": self.state_dtype,
            "dataset": self.dataset, "split": self.split, "record_hashes": sorted(set(self.record_hashes)),
            "n_triplets": self.n_triplets, "n_skipped": self.n_skipped, "seed": int(self.hparams.seed),
            "shared_encoders": bool(self.hparams.shared_encoders), "mu_count": int(self.mu_count),
            "tool": TOOL,
        }

    def payload(self) -> dict[str, Any]:
        """The archive payload (README, "Offline stage", archive format): only tensors and plain values."""
        zeta, w = self.zeta_and_decoder()
        out: dict[str, Any] = {
            "meta": self.meta(),
            "mu": (self.mu_sum / max(1, self.mu_count)).float(),
            "bank.h_sem": self.bank["h_sem"].view.clone(), "bank.h_pos": self.bank["h_pos"].view.clone(),
            "bank.h_neg": self.bank["h_neg"].view.clone(), "bank.ids": torch.tensor(self.ids, dtype=torch.int64),
            "fit.r_pos": self.fit["r_pos"].view.clone(), "fit.r_neg": self.fit["r_neg"].view.clone(),
            "zeta": zeta, "w_zeta": w,
        }
        out.update(encoder_state(self.enc_sem, self.enc_tru, self.layers, bool(self.hparams.shared_encoders)))
        return out

    def save(self, path: str, extra: dict[str, Any] | None = None) -> str:
        return str(save_archive(self.payload(), path, extra))

    def load_payload(self, payload: dict[str, Any], where: str = "<payload>") -> None:
        """Resume from a payload of the same model and layers (bank, μ, encoders, fit, counts)."""
        meta = payload["meta"]
        if ([int(layer) for layer in meta["layers"]] != self.layers or int(meta["d"]) != self.d
                or int(meta["d_t"]) != self.d_t):
            raise UniKEArchiveError(f"{where}: archive layers {meta['layers']} / d {meta['d']} / d_t {meta['d_t']} do "
                                    f"not match the training hparams ({self.layers} / {self.d} / {self.d_t}); "
                                    f"set `layers` and `tru_dim` as in the archive or start without `archive`.")
        if meta.get("fingerprint") != fingerprint(self.infos):
            raise UniKEArchiveError(f"{where}: fingerprint mismatch: the archive was built on another checkpoint "
                                    f"({meta.get('model_name')!r}).")
        if bool(meta.get("shared_encoders", False)) != bool(self.hparams.shared_encoders):
            raise UniKEArchiveError(f"{where}: shared_encoders differs between the archive and the hparams.")
        load_encoder_state(self.enc_sem, self.enc_tru, payload, self.layers, bool(self.hparams.shared_encoders))
        for k in ("h_sem", "h_pos", "h_neg"):
            self.bank[k].set(payload[f"bank.{k}"])
        for k in ("r_pos", "r_neg"):
            self.fit[k].set(payload[f"fit.{k}"])
        self.ids = [int(i) for i in payload["bank.ids"].tolist()]
        self.banked = set(self.ids)
        count = int(meta.get("mu_count", 1))
        self.mu_sum = payload["mu"].double() * count
        self.mu_count = count
        self.record_hashes = list(meta.get("record_hashes", ()))
        self.n_triplets = int(meta.get("n_triplets", self.bank_size))
        self.n_skipped = int(meta.get("n_skipped", 0))

    def load(self, path: str) -> None:
        self.load_payload(read_payload(path), path)

