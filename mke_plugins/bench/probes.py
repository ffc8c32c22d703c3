"""The probe queries of one edit case and their batched, teacher-forced evaluation.

A case's probes are every query its metrics need: the edit itself (reliability), its text and
image paraphrases (T-Gen, M-Gen), the two locality questions, the text-only and image-only forms
(decoupling), and the portability and fine-locality items. They are built as adapter
``Query`` objects (image ``None`` = text-only, no placeholder), batched into as few forward
passes as possible (the adapter builds each row exactly as EasyEdit's evaluator does, then
left-pads), and run once on the unedited model and once on the edited one with the same inputs.
The T-Loc and M-Loc probes run one row per forward, as EasyEdit's evaluator runs them: their
EasyEdit-protocol scores compare top-10 ids at every position, where logits of rank 5-10 lie close
enough for a padded batch's float rounding to swap two of them (FT on the world: one of 220
positions of a case, against EasyEdit's own number).
:class:`ProbeOutput` keeps what the scorer needs from each row, so logits never outlive a batch.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import torch

from mke_plugins.adapters.base import Batch, Query
from mke_plugins.core import scoring

#: probe kinds whose score is agreement with the pre-edit model rather than accuracy
LOCALITY_KINDS = ("locality", "multimodal_locality", "fine_locality")
#: EasyEdit main's locality protocol: probe kind -> k of its rank-by-rank top-k match over every
#: position of the row (``attach_topk_locality_metrics``: top-1 for T-Loc, top-10 for M-Loc)
EASYEDIT_TOPK = {"locality": 1, "multimodal_locality": 10}


@dataclass(frozen=True)
class Probe:
    """One query of a case: its metric kind, the query, and tags (fine-locality scope, form)."""

    kind: str
    query: Query
    tags: tuple[str, ...] = ()


def _present(value: Any) -> bool:
    return value is not None and not (isinstance(value, (str, list, tuple)) and len(value) == 0)


def fine_scope(item: dict[str, Any]) -> str:
    """``same_image`` or ``same_entity`` for a fine-locality item.

    An explicit ``scope`` field wins; otherwise an item shown with a picture (the edit's own, in
    the world) is ``same_image`` and a text-only item (it names the entity) is ``same_entity``.
    """
    scope = item.get("scope")
    if scope in ("same_image", "same_entity"):
        return scope
    return "same_image" if _present(item.get("image")) else "same_entity"


def case_probes(request: dict[str, Any]) -> list[Probe]:
    """All probes ``request`` supports, in a fixed order (``rewrite`` first)."""
    img, prompt, target = request.get("image"), request["prompt"], request["target"]
    probes = [Probe("rewrite", Query(img, prompt, target))]
    if _present(request.get("rephrase_prompt")):
        probes.append(Probe("rephrase", Query(img, request["rephrase_prompt"], target)))
    if _present(request.get("image_rephrase")):
        probes.append(Probe("image_rephrase", Query(request["image_rephrase"], prompt, target)))
    if _present(request.get("locality_prompt")) and _present(request.get("locality_ground_truth")):
        probes.append(Probe("locality", Query(None, request["locality_prompt"], request["locality_ground_truth"])))
    if all(_present(request.get(k)) for k in ("multimodal_locality_image", "multimodal_locality_prompt",
                                              "multimodal_locality_ground_truth")):
        probes.append(Probe("multimodal_locality", Query(request["multimodal_locality_image"],
                                                         request["multimodal_locality_prompt"],
                                                         request["multimodal_locality_ground_truth"])))
    if _present(request.get("text_only_prompt")):
        probes.append(Probe("text_only", Query(None, request["text_only_prompt"], target)))
    if _present(request.get("image_only_prompt")) and _present(img):
        probes.append(Probe("image_only", Query(img, request["image_only_prompt"], target)))
    for item in request.get("portability") or []:
        image = item.get("image") if _present(item.get("image")) else None
        probes.append(Probe("portability", Query(image, item["prompt"], str(item["answer"])),
                            tags=(str(item.get("form", "")),)))
    for item in request.get("fine_locality") or []:
        image = item.get("image") if _present(item.get("image")) else None
        probes.append(Probe("fine_locality", Query(image, item["prompt"], str(item["answer"])),
                            tags=(fine_scope(item), str(item.get("form", "")))))
    return probes


#: generality probes whose reading by the unedited model is checked (:func:`understood`)
GENERALITY_KINDS = ("rephrase", "image_rephrase", "text_only", "image_only")


def original_probes(request: dict[str, Any]) -> list[Probe]:
    """The generality probes of ``request`` asked for the fact's original answer (``pred``, as in
    EasyEdit's VQA records and the world's): none when the record does not carry one."""
    original = request.get("pred")
    if not _present(original) or not isinstance(original, str):
        return []
    return [Probe(p.kind, Query(p.query.image, p.query.prompt, original))
            for p in case_probes(request) if p.kind in GENERALITY_KINDS]


def understood(adapter: Any, model: Any, tok: Any, request: dict[str, Any], max_rows: int = 64) -> dict[str, bool]:
    """Per generality kind: whether ``model`` (unedited) answers that probe with the original answer,
    every token. A question the model cannot read measures the model, not the editor: the bench
    reports generality over the understood cases beside the plain number (``*_acc_understood``)."""
    probes = original_probes(request)
    if not probes:
        return {}
    outs = run_probes(adapter, model, build_batches(adapter, model, tok, probes, max_rows))
    return {p.kind: o.success for p, o in zip(probes, outs, strict=True)}


@dataclass
class ProbeOutput:
    """What the scorer keeps from one probe row."""

    acc: float | None  # token accuracy against the probe's target (None: no target tokens)
    success: bool  # every target token is the argmax
    top1: torch.Tensor  # (n_answer, 1) argmax ids at the answer positions
    # (n_tokens, k) top-k ids at every non-padding position of the row, k from EASYEDIT_TOPK
    # (T-Loc and M-Loc probes only: EasyEdit's locality protocol)
    seq_topk: torch.Tensor | None = None


@dataclass
class ProbeBatches:
    """The probes of one case and their model inputs, built once and reused for pre and post."""

    probes: list[Probe]
    batches: list[Batch] = field(default_factory=list)
    #: per batch, the indices into ``probes`` of its rows, in row order
    rows: list[list[int]] = field(default_factory=list)

    @property
    def n_rows(self) -> int:
        return len(self.probes)

    @property
    def nbytes(self) -> int:
        """Bytes held by the batches' tensors (mostly pixel values)."""
        total = 0
        for b in self.batches:
            tensors = [*b.inputs.values(), b.labels, b.attention_mask, b.image_mask]
            total += sum(t.numel() * t.element_size() for t in tensors if torch.is_tensor(t))
        return total


def build_batches(adapter: Any, model: Any, tok: Any, probes: Sequence[Probe], max_rows: int = 64) -> ProbeBatches:
    """Adapter batches covering ``probes``: the T-Loc and M-Loc probes (:data:`EASYEDIT_TOPK`) one
    row each, unpadded as EasyEdit evaluates them; the others in order, at most ``max_rows`` a batch."""
    if max_rows < 1:
        raise ValueError(f"max_rows must be at least 1, got {max_rows}")
    probes = list(probes)
    out = ProbeBatches(probes)
    rest = [i for i, p in enumerate(probes) if p.kind not in EASYEDIT_TOPK]
    groups = [rest[s:s + max_rows] for s in range(0, len(rest), max_rows)]
    groups += [[i] for i, p in enumerate(probes) if p.kind in EASYEDIT_TOPK]
    for group in groups:
        out.batches.append(adapter.batch(model, tok, [probes[i].query for i in group]))
        out.rows.append(group)
    return out


@torch.no_grad()
def run_probes(adapter: Any, model: Any, pb: ProbeBatches) -> list[ProbeOutput]:
    """Evaluate every probe on ``model`` (teacher forced); one forward pass per batch.

    The same logits give both locality protocols: top-1 at the answer positions (ours) and, for the
    T-Loc and M-Loc probes, the top-k ids at every position (EasyEdit's, :data:`EASYEDIT_TOPK`).
    """
    outputs: list[ProbeOutput | None] = [None] * len(pb.probes)
    for batch, rows in zip(pb.batches, pb.rows, strict=True):
        logits = adapter.forward(model, batch)
        labels = batch.labels.to(logits.device)
        acc = scoring.token_accuracy(logits, labels).tolist()
        ok = scoring.success(logits, labels).tolist()
        top1 = scoring.answer_topk(logits, labels, k=1)
        for b, i in enumerate(rows):
            probe = pb.probes[i]
            seq = None
            if probe.kind in EASYEDIT_TOPK:
                seq = scoring.sequence_topk(logits[b:b + 1], batch.attention_mask[b:b + 1],
                                            k=EASYEDIT_TOPK[probe.kind])[0]
            outputs[i] = ProbeOutput(scoring.finite(acc[b]), bool(ok[b]), top1[b], seq)
        del logits
    assert all(o is not None for o in outputs), "build_batches left a probe out"
    return outputs  # type: ignore[return-value]
