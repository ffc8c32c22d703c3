"""Non-finite numbers: every method stops on an inf/nan loss naming itself, the step and the term."""

from __future__ import annotations

import copy

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
    from mke_plugins.hparams import load_hparams
    from mke_plugins.registry import get_registry

    model, tok, reqs = world_case
    model = copy.deepcopy(model)
    hparams = load_hparams(method, "world")
    cls = type(get_adapter(model, hparams))
    loss = cls.loss
    monkeypatch.setattr(cls, "loss", lambda self, *a, **k: loss(self, *a, **k) * NAN)
    apply = get_registry().get(method).spec.resolved("apply_multimodal")
    with pytest.raises(NonFiniteLossError, match=rf"^{label}: the loss term '{term}' is not finite at {step} "
                                                 r"\(it is nan\)\. Fix: lower `(edit_)?lr`"):
        apply(model, tok, reqs, hparams, return_orig_weights=True)


def test_ft_stops_before_writing_nan_into_the_weight(world_case, monkeypatch):
    from mke_plugins.adapters import get_adapter
    from mke_plugins.hparams import load_hparams
    from mke_plugins.methods.baselines.ft.ft_main import apply_ft_to_multimodal_model

    model, tok, reqs = world_case
    model = copy.deepcopy(model)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    hparams = load_hparams("FT", "world")
    cls = type(get_adapter(model, hparams))
    loss, calls = cls.loss, []

    def nan_on_second_step(self, *a, **k):
        calls.append(1)
        return loss(self, *a, **k) * (NAN if len(calls) > 1 else 1.0)

    monkeypatch.setattr(cls, "loss", nan_on_second_step)
    with pytest.raises(NonFiniteLossError, match=r"^FT: the loss term 'nll' is not finite at step 2"):
        apply_ft_to_multimodal_model(model, tok, reqs, hparams)
    assert all(torch.isfinite(p).all() for p in model.parameters())
    assert sum(not torch.equal(p, before[n]) for n, p in model.named_parameters()) == 1  # one finite step

