"""Non-finite numbers: every method stops on an inf/nan loss naming itself, the step and the term;
the bench saves inf/nan results as JSON null and prints them instead of crashing."""

from __future__ import annotations

import copy
import json
import math

import pytest
import torch

from mke_hooks import MKEError, NonFiniteLossError
from mke_plugins.core.finite import check_finite

NAN, INF = float("nan"), float("inf")


def test_check_finite_names_method_step_and_first_bad_term():
    check_finite("M", 1, a=torch.tensor(1.0), b=2.0, off=None)
    with pytest.raises(NonFiniteLossError, match=r"^M: the loss term 'b' is not finite at step 3 \(it is inf\)\. "
                                                 r"Fix: lower the learning rate"):
        check_finite("M", 3, a=torch.tensor(1.0), b=torch.tensor([0.0, INF]), c=NAN)
    with pytest.raises(FloatingPointError, match=r"'c' is not finite at outer step 2 \(it is nan\)\. Fix: x$"):
        check_finite("M", 2, where="outer step", fix="x", c=NAN)
    assert issubclass(NonFiniteLossError, MKEError)


# -- every method's optimisation loop ------------------------------------------------------------
@pytest.fixture(scope="module")
def world_case():
    from mke_plugins import world

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    model, tok = world.load()
    yield model, tok, world.records("edit")[:1]
    torch.set_num_threads(before)


@pytest.mark.parametrize("method, label, term, step", [
    ("FT", "FT", "nll", "step 1"), ("LoRA", "LoRA", "nll", "step 1"),
    ("DECODE", r"DECODE \((text|image|joint) stage\)", "l_tgt", "step 1"),
    ("LDKE", "LDKE", "nll", "step 1"), ("UniKE", "UniKE", "nll", "step 1"), ("ASAM", "ASAM", "nll", "outer step 1"),
])
def test_a_nan_loss_stops_every_method_naming_method_step_and_term(world_case, monkeypatch, method, label, term,
                                                                   step):
    """The target loss turns nan (still differentiable, so nothing else stops the loop)."""
    from mke_plugins.adapters import get_adapter
    from mke_plugins.adapters.base import AnswerLogits
    from mke_plugins.hparams import load_hparams
    from mke_plugins.registry import get_registry

    model, tok, reqs = world_case
    model = copy.deepcopy(model)
    hparams = load_hparams(method, "world")
    cls = type(get_adapter(model, hparams))
    loss = cls.loss
    monkeypatch.setattr(cls, "loss", lambda self, *a, **k: loss(self, *a, **k) * NAN)
    answers_loss = AnswerLogits.loss  # the losses read from answer-position logits
    monkeypatch.setattr(AnswerLogits, "loss", lambda self, *a, **k: answers_loss(self, *a, **k) * NAN)
    apply = get_registry().get(method).spec.resolved("apply_multimodal")
    with pytest.raises(NonFiniteLossError, match=rf"^{label}: the loss term '{term}' is not finite at {step} "
                                                 r"\(it is nan\)\. Fix: lower `(edit_)?lr`"):
        apply(model, tok, reqs, hparams, return_orig_weights=True)


def test_ft_stops_before_writing_nan_into_the_weight(world_case, monkeypatch):
    from mke_plugins.adapters.base import AnswerLogits
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.ft.ft_main import apply_ft_to_multimodal_model

    model, tok, reqs = world_case
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hparams = load_hparams("FT", "world")
    loss, calls = AnswerLogits.loss, []  # FT's loss reads the answer-position logits

    def nan_on_second_step(self, *a, **k):
        calls.append(1)
        return loss(self, *a, **k) * (NAN if len(calls) > 1 else 1.0)

    monkeypatch.setattr(AnswerLogits, "loss", nan_on_second_step)
    with pytest.raises(NonFiniteLossError, match=r"^FT: the loss term 'nll' is not finite at step 2"):
        apply_ft_to_multimodal_model(model, tok, reqs, hparams)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    # the finite first step is undone too: the method template puts back whatever a failed apply changed
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


# -- the bench's table, JSON and plot ---------------------------------------------------------------
def _blown_up_result() -> dict:
    row = {"rewrite_acc": NAN, "locality_acc": 1.0, "edit_seconds_median": INF, "edit_seconds_p90": INF,
           "edit_to_fwdbwd_ratio": NAN, "peak_memory_mb": -INF, "hparams": {"lr": INF},
           "extra": {"losses": [1.0, NAN], "pair": (INF, 2)}}
    return {"model": "m", "data": "d", "mode": "single", "cases": 1, "methods": {"FT[lr=inf]": row}, "notes": []}


def test_bench_writes_non_finite_numbers_as_json_null(tmp_path):
    from mke_plugins.bench.report import write_json

    result = _blown_up_result()
    data = json.loads(write_json(result, tmp_path / "r.json").read_text())
    row = data["methods"]["FT[lr=inf]"]
    assert row["rewrite_acc"] is None and row["edit_seconds_median"] is None and row["peak_memory_mb"] is None
    assert row["hparams"] == {"lr": None} and row["extra"] == {"losses": [1.0, None], "pair": [None, 2]}
    assert row["locality_acc"] == 1.0 and math.isinf(result["methods"]["FT[lr=inf]"]["edit_seconds_median"])


def test_bench_table_and_plot_show_non_finite_numbers(tmp_path):
    from mke_plugins.bench.report import plot, table

    text = table(_blown_up_result())
    row = next(line for line in text.splitlines() if line.startswith("FT[lr=inf]")).split()
    assert row[1] == "nan" and "inf" in row and "-inf" in row and "1.000" in row
    assert plot(_blown_up_result(), tmp_path / "r.png").read_bytes()[:4] == b"\x89PNG"
