"""DECODE steps 1–6 (README, "Algorithm"): stage queries, batches, reference pass, neuron scores, groups.

For one request this module builds the unimodal trigger queries (README, stage table), runs one no-grad
forward per stage batch on the model as it is, captures the value-matrix inputs ``a^ℓ`` at the
answer positions only, keeps the prompt-position log-probabilities as each stage's KL reference,
and scores every analysed neuron against the *new* target tokens:

    s_i^ℓ(j) = a_i^ℓ(x_{p_j}) · ⟨v_i^ℓ, u_{y_j}⟩

The projections ``⟨v_i^ℓ, u_{y_j}⟩`` are ``(W_val^ℓ)^T · U_y^T`` (``d_ff × m``, fp32), formed in column
chunks: the ``vocab × d_ff`` matrix is never built. Selection is per answer *position* (a repeated
token is two candidates lists), ties go to the lower (layer, index), and the group cap ranks by
score (``truncate_by: score``) or by (layer, index) (the reference's ``index``).

Everything model-specific comes from the adapter; this module never names a module.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from mke_hooks import HparamsError
from mke_plugins.adapters import Batch, LayerInfo, Query, VLMAdapter, model_dtype
from mke_plugins.core.hooks import capture
from mke_plugins.core.requests import image_only_prompt, text_only_prompt

from .decode_hparams import DECODEHyperParams

Neuron = tuple[int, int]  # (layer index, neuron index)

#: columns of W_val projected at once (bounds the fp32 temporary to d × chunk)
PROJ_CHUNK = 4096
#: KL references above this many bytes in fp32 are kept in the model dtype (README, "Cost")
KL_REF_FP32_LIMIT = 2 * 1024 ** 3


# -- step 0: stage queries (README, stage table) ---------------------------------------------

@dataclass(frozen=True)
class StageQueries:
    """The trigger queries of one request: text (no image), image (``None`` without image), paired."""

    text: Query
    image: Query | None
    paired: Query


def stage_queries(request: dict[str, Any]) -> StageQueries:
    """Stage table: use ``text_only_prompt`` / ``image_only_prompt`` when present, else ``prompt``."""
    prompt, target, image = request["prompt"], request["target"], request.get("image")
    text_prompt = text_only_prompt(request) or prompt
    image_prompt = image_only_prompt(request) or prompt
    return StageQueries(
        text=Query(None, text_prompt, target),
        image=None if image is None else Query(image, image_prompt, target),
        paired=Query(image, prompt, target),
    )


# -- steps 1–3: batches and the reference pass ----------------------------------------------

@dataclass
class StageInput:
    """A stage query's batch, its answer / KL positions and its fixed KL reference."""

    query: Query
    batch: Batch
    answer_pos: torch.Tensor  # (B, T) bool: positions predicting the m answer tokens (EOS excluded)
    answer_ids: list[int]  # y_1..y_m
    kl_pos: torch.Tensor  # (B, T) bool: prompt positions used in the KL
    ref_logprobs: torch.Tensor | None = None  # (P, V) log-probabilities at kl_pos (fp32 or model dtype)
    acts: dict[int, torch.Tensor] = field(default_factory=dict)  # layer -> (m, d_ff) activations
    appends_eos: bool = False  # the batch's targets end with the family's end-of-answer token


def analysed_layers(n_layers: int, hparams: DECODEHyperParams) -> list[int]:
    """Step 2: ``layers`` when given, else 0 … L−1−``num_last_layers_excluded``."""
    if hparams.layers is not None:
        bad = [i for i in hparams.layers if not 0 <= i < n_layers]
        if bad:
            raise HparamsError(f"layer indices {bad} do not exist: the model has {n_layers} decoder layers "
                               f"(0 … {n_layers - 1}).", key="layers",
                               fix=f"use indices below {n_layers}, or null.")
        return sorted(hparams.layers)
    keep = n_layers - hparams.num_last_layers_excluded
    if keep < 1:
        raise HparamsError(f"num_last_layers_excluded={hparams.num_last_layers_excluded} leaves no layer to "
                           f"edit: the model has {n_layers} decoder layers.", key="num_last_layers_excluded",
                           fix=f"use a value below {n_layers}, or list `layers` explicitly.")
    return list(range(keep))


def build_stage_input(adapter: VLMAdapter, model: nn.Module, tok: Any, query: Query,
                      hparams: DECODEHyperParams) -> StageInput:
    """Step 1: the stage batch (target + EOS when ``append_eos`` and the family has one) and its positions."""
    eos = adapter.eos_token_id(tok) if hparams.append_eos else None
    batch = adapter.batch(model, tok, [query], append_eos=eos is not None)
    answer = batch.answer_mask.clone()
    if eos is not None:  # the last answer position of each row predicts EOS: not an answer token
        for b, row in enumerate(batch.answer_positions()):
            answer[b, row[-1]] = False
    pos = answer[0].nonzero().flatten()
    answer_ids = [int(batch.labels[0, p + 1]) for p in pos.tolist()]
    kl_pos = batch.prompt_mask & ~batch.answer_mask
    if not hparams.kl_on_image_tokens:
        kl_pos = kl_pos & ~adapter.image_token_mask(batch).to(kl_pos.device)
    return StageInput(query, batch, answer, answer_ids, kl_pos, appends_eos=eos is not None)


def reference_pass(adapter: VLMAdapter, model: nn.Module, stage: StageInput, layers: list[LayerInfo] | None,
                   *, keep_kl: bool = True) -> None:
    """Step 3: one no-grad forward; captures ``a^ℓ`` at the answer positions of ``layers`` (if any)
    and stores the prompt-position log-probabilities as the fixed KL reference."""
    points = {info.index: info.value_in for info in layers or []}
    with torch.no_grad(), capture(points, positions=stage.answer_pos) as rec:
        logits = adapter.forward(model, stage.batch)
    stage.acts = {i: rec[i].float() for i in points}
    if keep_kl:
        sel = logits[stage.kl_pos.to(logits.device)]
        n_bytes = sel.shape[0] * sel.shape[-1] * 4
        ref_dtype = torch.float32 if n_bytes <= KL_REF_FP32_LIMIT else model_dtype(model)
        stage.ref_logprobs = torch.cat([F.log_softmax(c.float(), -1).to(ref_dtype)
                                        for c in sel.split(kl_chunk(sel.shape[-1]))]) if sel.numel() else \
            sel.float().to(ref_dtype)
    del logits


def kl_chunk(vocab: int) -> int:
    """Positions per KL chunk: about 2^25 fp32 values at a time."""
    return max(1, (1 << 25) // max(vocab, 1))


# -- step 4: scores ---------------------------------------------------------------------------

def projections(value: nn.Linear, u_rows: torch.Tensor) -> torch.Tensor:
    """``(W_val)^T · U_y^T`` as ``(d_ff, m)`` fp32, in column chunks (never vocab × d_ff)."""
    w = value.weight
    u = u_rows.to(device=w.device, dtype=torch.float32)  # (m, d)
    parts = [w[:, c:c + PROJ_CHUNK].float().t() @ u.t() for c in range(0, w.shape[1], PROJ_CHUNK)]
    return torch.cat(parts, dim=0)


def layer_scores(acts: torch.Tensor, value: nn.Linear, u_rows: torch.Tensor) -> torch.Tensor:
    """``(m, d_ff)`` fp32 scores ``s_i(j) = a_i(x_{p_j}) · ⟨v_i, u_{y_j}⟩`` of one layer."""
    proj = projections(value, u_rows)  # (d_ff, m)
    return acts.to(device=proj.device, dtype=torch.float32) * proj.t()


def neuron_scores(adapter: VLMAdapter, model: nn.Module, stage: StageInput,
                  layers: list[LayerInfo]) -> dict[int, torch.Tensor]:
    """Step 4 for one stage: per analysed layer, the ``(m, d_ff)`` score matrix (on CPU, fp32)."""
    head = adapter.lm_head(model).weight  # raw rows: no final norm, no bias
    ids = torch.tensor(stage.answer_ids, dtype=torch.long, device=head.device)
    with torch.no_grad():
        u_rows = head.index_select(0, ids)
        return {info.index: layer_scores(stage.acts[info.index], info.value, u_rows).cpu() for info in layers}


# -- step 5: per-token top-k, union, truncation ----------------------------------------------

def select_neurons(scores: dict[int, torch.Tensor], k: int, cap: int, truncate_by: str) -> dict[Neuron, float]:
    """Top-``k`` per answer position over all layers, union (max score), truncated to ``cap``.

    Returns ``{(layer, index): max score}`` ordered by (layer, index).
    """
    order = sorted(scores)
    if not order:
        return {}
    flat = torch.cat([scores[layer] for layer in order], dim=1)  # (m, Σ d_ff), (layer, index) order
    offsets, starts = [], 0
    for layer in order:
        offsets.append((starts, layer))
        starts += scores[layer].shape[1]
    best: dict[Neuron, float] = {}
    for j in range(flat.shape[0]):
        row = torch.nan_to_num(flat[j], nan=float("-inf"))
        # stable descending sort: equal scores keep (layer, index) order
        top = torch.sort(row, descending=True, stable=True).indices[:k].tolist()
        for col in top:
            neuron = _neuron_of(col, offsets)
            s = float(row[col])
            if neuron not in best or s > best[neuron]:
                best[neuron] = s
    ranked = sorted(best.items(), key=(lambda kv: (-kv[1], kv[0])) if truncate_by == "score" else
                    (lambda kv: kv[0]))
    return dict(sorted(ranked[:cap]))


def _neuron_of(col: int, offsets: list[tuple[int, int]]) -> Neuron:
    for start, layer in reversed(offsets):
        if col >= start:
            return layer, col - start
    raise IndexError(col)


# -- step 6: groups ---------------------------------------------------------------------------

def groups(n_text: dict[Neuron, float], n_image: dict[Neuron, float], group_mode: str
           ) -> tuple[list[Neuron], list[Neuron]]:
    """``(G_T, G_I)``: overlap keeps both sets; disjoint gives shared neurons to the text stage."""
    g_t = sorted(n_text)
    g_i = sorted(n_image) if group_mode == "overlap" else sorted(set(n_image) - set(n_text))
    return g_t, g_i


def jaccard(a: dict[Neuron, float] | list[Neuron], b: dict[Neuron, float] | list[Neuron]) -> float | None:
    sa, sb = set(a), set(b)
    union = sa | sb
    return len(sa & sb) / len(union) if union else None


# -- steps 1–6 together ---------------------------------------------------------------------

@dataclass
class Localization:
    """What steps 1–6 produce for one request."""

    layers: list[int]
    text: StageInput
    image: StageInput | None
    paired: StageInput | None  # joint strategy only
    n_text: dict[Neuron, float]
    n_image: dict[Neuron, float]
    g_text: list[Neuron]
    g_image: list[Neuron]


def localize(adapter: VLMAdapter, model: nn.Module, tok: Any, request: dict[str, Any],
             hparams: DECODEHyperParams, infos: list[LayerInfo] | None = None) -> Localization:
    """Steps 1–6 for one (already validated) request, on the model as it is now."""
    infos = infos if infos is not None else adapter.layers(model)
    idx = analysed_layers(len(infos), hparams)
    analysed = [infos[i] for i in idx]
    q = stage_queries(request)
    joint = hparams.stage_order == "joint"

    text = build_stage_input(adapter, model, tok, q.text, hparams)
    reference_pass(adapter, model, text, analysed, keep_kl=not joint)
    image = None
    if q.image is not None:
        image = build_stage_input(adapter, model, tok, q.image, hparams)
        reference_pass(adapter, model, image, analysed, keep_kl=not joint)
    paired = None
    if joint:
        paired = build_stage_input(adapter, model, tok, q.paired, hparams)
        reference_pass(adapter, model, paired, None)

    k, cap, how = hparams.topk_per_token, hparams.max_neurons_per_group, hparams.truncate_by
    n_text = select_neurons(neuron_scores(adapter, model, text, analysed), k, cap, how)
    n_image = select_neurons(neuron_scores(adapter, model, image, analysed), k, cap, how) if image else {}
    for stage in (text, image):
        if stage is not None:
            stage.acts = {}  # no longer needed
    g_text, g_image = groups(n_text, n_image, hparams.group_mode)
    return Localization(idx, text, image, paired, n_text, n_image, g_text, g_image)
