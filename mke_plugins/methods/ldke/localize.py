"""Fast Localization and its reference scorers: which layers hold this fact (README, "Algorithm", 1–4).

* ``grad`` (Fast Localization): one forward and one backward pass; per layer
  s_l = ||grad_{W_l} NLL||_F = ||G_l^T A_l||_F computed from the T x T Gram matrices
  (s_l^2 = sum((A A^T) * (G G^T))), never materialising the d x d_ff gradient; normalised by the
  per-model baseline mu (c_l = p_l / mu_l) or by ||W_l||_F (``layer_prior: none``).
* ``trace``: a cheap causal trace: noise on the image (else text prompt) embeddings, one
  corrupted row per layer with that layer's MLP output restored from the clean row; 2 + L rows,
  one batched forward.
* ``full_trace``: the ROME-style trace: every (prompt position, layer) residual state restored
  in turn, ``trace_samples`` noise draws each; a layer's score is the maximum over positions of
  the mean indirect effect. T * L * samples rows in batches of ``trace_batch``.
* ``fixed``: the configured layers, or the static top-k of mu.

Base parameters never get gradients: their ``requires_grad`` flags are switched off for the
pass and put back exactly; gradients are taken with ``torch.autograd.grad`` on activations.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mke_hooks import HparamsError
from mke_plugins.adapters.base import Batch, Query, VLMAdapter, unwrap_model
from mke_plugins.core.hooks import HookSet
from mke_plugins.core.modes import frozen


@dataclass
class Localization:
    """The layers chosen for one edit and how they were found."""

    layers: list[int]
    method: str
    scores: list[float] = field(default_factory=list)  # the normalised scores c_l (or IE_l for traces)
    seconds: float = 0.0
    forward_equivalents: float = 0.0  # cost in single-row forward passes (backward counted as 2)

    @property
    def top(self) -> int:
        return self.layers[0]


def top_k_layers(scores: Sequence[float], k: int) -> list[int]:
    """The k best layers, best first; ties go to the deeper layer."""
    order = sorted(range(len(scores)), key=lambda i: (float(scores[i]), i), reverse=True)
    return order[:k]


def check_layers(n_layers: int, top_k: int, fixed: Sequence[int] | None) -> None:
    if top_k > n_layers:
        raise HparamsError(f"top_k = {top_k} but the model has {n_layers} decoder layers.", key="top_k",
                           fix=f"use a value from 1 to {n_layers}.")
    if fixed is not None:
        bad = [i for i in fixed if not 0 <= int(i) < n_layers]
        if bad:
            raise HparamsError(f"fixed_layers {bad} are outside the model's {n_layers} decoder layers.",
                               key="fixed_layers", fix=f"use indices 0..{n_layers - 1}.")


def shifted_row_nll(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) mean NLL of each row's labelled tokens, ``logits[:, t]`` predicting ``labels[:, t + 1]``."""
    lg = logits[:, :-1].float()
    tg = labels[:, 1:].to(lg.device)
    ce = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), tg.reshape(-1), ignore_index=-100,
                         reduction="none").view(tg.shape)
    mask = (tg != -100).float()
    return (ce * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def _rows(x: torch.Tensor, batch_size: int) -> torch.Tensor:
    """(B, T, k) view of an FFN tensor that may be flattened to (B*T, k)."""
    return x.view(batch_size, -1, x.shape[-1]) if x.dim() == 2 else x


def _gram_sq(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """Per row ||g^T a||_F^2 = sum((a a^T) * (g g^T)), in float32, (B,)."""
    a, g = a.float(), g.float()
    return (torch.einsum("btk,bsk->bts", a, a) * torch.einsum("btk,bsk->bts", g, g)).sum((1, 2))


RunFn = Callable[[], tuple[torch.Tensor, torch.Tensor]]  # -> (logits, labels), labels shifted-aligned


def gradient_scores(adapter: VLMAdapter, model: nn.Module, run: RunFn, batch_size: int,
                    score_modules: str = "value") -> torch.Tensor:
    """Raw per-row layer scores s_l, shape (B, L): one forward and one backward pass.

    ``run`` performs the forward on ``model`` and returns logits and their labels; the loss is
    the sum over rows of each row's mean target NLL, so each row's scores are its own.
    """
    base = unwrap_model(model)
    infos = adapter.layers(base)
    acts: dict[tuple[int, str], torch.Tensor] = {}
    outs: dict[tuple[int, str], torch.Tensor] = {}
    with frozen(base, eval_mode=False), HookSet() as hooks:
        def leaf(x: torch.Tensor) -> torch.Tensor:
            return x.detach().requires_grad_(True)

        hooks.add(adapter.embed_output(base), leaf)
        handles = []
        for info in infos:
            mods = [("value", info.value)]
            if score_modules == "mlp":
                mods += [(f"key{j}", m) for j, m in enumerate(info.keys)]
            for name, mod in mods:
                def hook(m: nn.Module, args: tuple, out: torch.Tensor, key=(info.index, name)) -> None:
                    acts[key] = args[0].detach()
                    outs[key] = out
                handles.append(mod.register_forward_hook(hook))
        try:
            logits, labels = run()
        finally:
            for h in handles:
                h.remove()
        loss = shifted_row_nll(logits, labels).sum()
        keys = list(outs)
        grads = torch.autograd.grad(loss, [outs[k] for k in keys], allow_unused=True)
    scores = torch.zeros(batch_size, len(infos), dtype=torch.float32, device=logits.device)
    for key, g in zip(keys, grads, strict=True):
        if g is None:
            continue
        a = _rows(acts[key], batch_size)
        scores[:, key[0]] += _gram_sq(a, _rows(g, batch_size)).to(scores.device)
    return scores.sqrt()


def normalised(raw: torch.Tensor, layer_prior: str, mu: torch.Tensor | None,
               weight_norms: torch.Tensor | None) -> torch.Tensor:
    """c_l = (s_l / sum_j s_j) / mu_l, or s_l / ||W_l||_F with ``layer_prior: none``."""
    raw = raw.float()
    if layer_prior == "none":
        return raw / weight_norms.to(raw.device).clamp_min(1e-12)
    p = raw / raw.sum(-1, keepdim=True).clamp_min(1e-12)
    return p / mu.to(raw.device).clamp_min(1e-12)


def shares(raw: torch.Tensor) -> torch.Tensor:
    """p_l = s_l / sum_j s_j per row (what mu averages)."""
    raw = raw.float()
    return raw / raw.sum(-1, keepdim=True).clamp_min(1e-12)


def value_norms(adapter: VLMAdapter, model: nn.Module) -> torch.Tensor:
    return torch.stack([info.value.weight.detach().float().norm() for info in adapter.layers(unwrap_model(model))])


# -- the traces ------------------------------------------------------------------------------

def _first_answer_position(batch: Batch) -> int:
    pos = batch.answer_positions()[0]
    if not pos:
        raise ValueError("the edit query has no target tokens to trace")
    return pos[0]


def _corrupt_positions(adapter: VLMAdapter, batch: Batch) -> torch.Tensor:
    img = adapter.image_token_mask(batch)[0] & batch.prompt_mask[0]
    return img if bool(img.any()) else batch.prompt_mask[0] & ~adapter.image_token_mask(batch)[0]


def _noise_fn(positions: torch.Tensor, noise: torch.Tensor, rows: torch.Tensor) -> Callable:
    """Add ``noise[r]`` (R, n_pos, d) at ``positions`` of the rows listed in ``rows`` (R,)."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        sub = x[rows.to(x.device)]
        sub[:, positions.to(x.device)] += noise.to(x.device, x.dtype)
        x[rows.to(x.device)] = sub
        return x
    return fn


def _noise_std(adapter: VLMAdapter, model: nn.Module, batch: Batch, positions: torch.Tensor
               ) -> tuple[float, torch.Tensor]:
    """The std of the clean embeddings at ``positions`` and the clean logits (one forward)."""
    captured: list[torch.Tensor] = []
    with HookSet() as hooks, torch.no_grad():
        hooks.add(adapter.embed_output(model), lambda x: captured.append(x.detach()) or None)
        logits = adapter.forward(model, batch)
    emb = captured[0][0, positions.to(captured[0].device)].float()
    return float(emb.std()), logits


def trace_scores(adapter: VLMAdapter, model: nn.Module, tok: Any, query: Query, *, noise: float,
                 seed: int) -> Localization:
    """Cheap causal trace: IE_l = p(y_o | layer l's MLP output restored) - p(y_o | corrupted)."""
    t0 = time.perf_counter()
    base = unwrap_model(model)
    infos = adapter.layers(base)
    L = len(infos)
    one = adapter.batch(base, tok, [query])
    pos = _corrupt_positions(adapter, one)
    std, logits = _noise_std(adapter, base, one, pos)
    ans = _first_answer_position(one)
    y_o = int(logits[0, ans].argmax())
    batch = adapter.batch(base, tok, [query] * (L + 2))
    gen = torch.Generator().manual_seed(seed)
    d = infos[0].value.weight.shape[0]
    noise_t = torch.randn(int(pos.sum()), d, generator=gen) * noise * std
    rows = torch.arange(1, L + 2)
    B = L + 2
    with HookSet() as hooks, torch.no_grad():
        hooks.add(adapter.embed_output(base), _noise_fn(pos, noise_t.expand(len(rows), -1, -1), rows))
        for info in infos:
            def restore(x: torch.Tensor, layer=info.index) -> torch.Tensor:
                x3 = _rows(x, B).clone()
                x3[2 + layer] = x3[0]
                return x3.view_as(x)
            hooks.add(info.ffn_out, restore)
        probs = adapter.forward(base, batch)[:, ans].float().softmax(-1)[:, y_o]
    ie = (probs[2:] - probs[1]).tolist()
    return Localization(layers=[], method="trace", scores=ie, seconds=time.perf_counter() - t0,
                        forward_equivalents=1 + B)


def full_trace_scores(adapter: VLMAdapter, model: nn.Module, tok: Any, query: Query, *, noise: float,
                      samples: int, batch_rows: int, seed: int) -> Localization:
    """ROME-style trace over (prompt position, layer) residual states; score = max_t mean IE."""
    t0 = time.perf_counter()
    base = unwrap_model(model)
    infos = adapter.layers(base)
    L = len(infos)
    one = adapter.batch(base, tok, [query])
    pos = _corrupt_positions(adapter, one)
    clean: dict[int, torch.Tensor] = {}
    with HookSet() as hooks:
        for info in infos:
            hooks.add(_layer_output(info),
                      lambda x, layer=info.index: clean.__setitem__(layer, x.detach()[0].clone()) or None)
        std, logits = _noise_std(adapter, base, one, pos)
    ans = _first_answer_position(one)
    y_o = int(logits[0, ans].argmax())
    prompt_pos = one.prompt_mask[0].nonzero().flatten().tolist()
    gen = torch.Generator().manual_seed(seed)
    d = infos[0].value.weight.shape[0]
    noises = torch.randn(samples, int(pos.sum()), d, generator=gen) * noise * std
    # one spec per row: (sample, layer or -1 for the corrupted baseline, position)
    specs = [(s, -1, -1) for s in range(samples)]
    specs += [(s, layer, t) for s in range(samples) for layer in range(L) for t in prompt_pos]
    R = min(batch_rows, len(specs))
    batch = adapter.batch(base, tok, [query] * R)
    probs = torch.empty(len(specs))
    n_forward = 1
    with torch.no_grad():
        for start in range(0, len(specs), R):
            chunk = specs[start:start + R]
            sample_idx = torch.tensor([c[0] for c in chunk] + [0] * (R - len(chunk)))
            with HookSet() as hooks:
                hooks.add(adapter.embed_output(base), _noise_fn(pos, noises[sample_idx], torch.arange(R)))
                for info in infos:
                    rows = [(r, c[2]) for r, c in enumerate(chunk) if c[1] == info.index]
                    if rows:
                        hooks.add(_layer_output(info), _restore_states(rows, clean[info.index]))
                p = adapter.forward(base, batch)[:, ans].float().softmax(-1)[:, y_o]
            probs[start:start + len(chunk)] = p[:len(chunk)].cpu()
            n_forward += R
    base_p = probs[:samples]
    ie = torch.zeros(L, len(prompt_pos))
    for i, (s, layer, t) in enumerate(specs[samples:], start=samples):
        ie[layer, prompt_pos.index(t)] += (probs[i] - base_p[s]) / samples
    scores = ie.max(1).values.tolist()
    return Localization(layers=[], method="full_trace", scores=scores, seconds=time.perf_counter() - t0,
                        forward_equivalents=n_forward)


def _layer_output(info: Any):
    from mke_plugins.adapters.base import HookPoint

    return HookPoint(info.layer, "output")


def _restore_states(rows: list[tuple[int, int]], clean: torch.Tensor) -> Callable:
    r_idx = torch.tensor([r for r, _ in rows])
    t_idx = torch.tensor([t for _, t in rows])

    def fn(x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        x[r_idx.to(x.device), t_idx.to(x.device)] = clean.to(x.device, x.dtype)[t_idx.to(x.device)]
        return x
    return fn


# -- the entry point ---------------------------------------------------------------------------

def localize(adapter: VLMAdapter, model: nn.Module, tok: Any, batch: Batch, hparams: Any,
             mu: torch.Tensor | None, method: str | None = None) -> Localization:
    """Pick the edit's top-k layers with ``method`` (default ``hparams.localization``)."""
    method = method or hparams.localization
    base = unwrap_model(model)
    n_layers = len(adapter.layers(base))
    check_layers(n_layers, hparams.top_k, hparams.fixed_layers)
    k = hparams.top_k
    t0 = time.perf_counter()
    if method == "grad":
        raw = gradient_scores(adapter, base, lambda: (adapter.forward(base, batch), batch.labels), len(batch),
                              hparams.score_modules)[0]
        norms = value_norms(adapter, base) if hparams.layer_prior == "none" else None
        c = normalised(raw, hparams.layer_prior, mu, norms).tolist()
        return Localization(top_k_layers(c, k), "grad", c, time.perf_counter() - t0, forward_equivalents=3.0)
    if method == "fixed":
        if hparams.fixed_layers is not None:
            layers = [int(i) for i in hparams.fixed_layers]
        else:
            layers = top_k_layers(mu.tolist(), k)
        return Localization(layers, "fixed", [], time.perf_counter() - t0, 0.0)
    query = batch.queries[0]
    if method == "trace":
        loc = trace_scores(adapter, base, tok, query, noise=hparams.trace_noise, seed=hparams.seed)
    elif method == "full_trace":
        loc = full_trace_scores(adapter, base, tok, query, noise=hparams.trace_noise, samples=hparams.trace_samples,
                                batch_rows=hparams.trace_batch, seed=hparams.seed)
    else:
        raise HparamsError(f"unknown localization {method!r}.", key="localization",
                           fix="use grad, trace, full_trace or fixed.")
    loc.layers = top_k_layers(loc.scores, k)
    return loc
