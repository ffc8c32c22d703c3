"""The scorer on hand-made logits and flags whose answers are known exactly."""

from __future__ import annotations

import math

import pytest
import torch

from mke_plugins.core import scoring as S

V = 6


def one_hot_logits(pred_ids: list[list[int]]) -> torch.Tensor:
    """Logits whose argmax at (b, t) is ``pred_ids[b][t]`` (second choice is always token 0 or 1)."""
    B, T = len(pred_ids), len(pred_ids[0])
    logits = torch.zeros(B, T, V)
    for b in range(B):
        for t in range(T):
            logits[b, t, pred_ids[b][t]] = 5.0
            logits[b, t, 1 if pred_ids[b][t] == 0 else 0] = 1.0
    return logits


# Row 0: targets 3, 4 at positions 3, 4 -> predicted at positions 2, 3 (preds 3, 4: both right).
# Row 1: targets 2, 5 -> preds at positions 2, 3 are 2 and 1 (one of two right).
# Row 2: one target 4 at position 4 -> pred at position 3 is 0 (wrong).
LABELS = torch.tensor([[-100, -100, -100, 3, 4],
                       [-100, -100, -100, 2, 5],
                       [-100, -100, -100, -100, 4]])
PREDS = [[0, 0, 3, 4, 0],
         [0, 0, 2, 1, 0],
         [0, 0, 0, 0, 0]]


def test_token_accuracy_and_success():
    logits = one_hot_logits(PREDS)
    acc = S.token_accuracy(logits, LABELS)
    assert acc.tolist() == [1.0, 0.5, 0.0]
    assert S.success(logits, LABELS).tolist() == [True, False, False]


def test_row_without_targets_has_no_accuracy_and_no_success():
    labels = torch.full((1, 4), -100)
    logits = one_hot_logits([[1, 2, 3, 4]])
    assert math.isnan(float(S.token_accuracy(logits, labels)[0]))
    assert S.success(logits, labels).tolist() == [False]
    assert S.mean_or_none([float("nan"), None]) is None


def test_shape_mismatch_is_refused():
    with pytest.raises(ValueError, match="logits must be"):
        S.token_accuracy(torch.zeros(2, 5, V), LABELS)


def test_answer_topk_reads_the_answer_positions_in_order():
    logits = one_hot_logits(PREDS)
    top1 = S.answer_topk(logits, LABELS, k=1)
    assert [t.flatten().tolist() for t in top1] == [[3, 4], [2, 1], [0]]
    top2 = S.answer_topk(logits, LABELS, k=2)
    assert top2[0].tolist() == [[3, 0], [4, 0]]


def test_locality_compares_with_pre_edit_predictions_not_the_answer():
    # pre predicts 2, 1 at row 1's answer positions (wrong w.r.t. labels 2, 5); post predicts 2, 5.
    pre = S.answer_topk(one_hot_logits(PREDS), LABELS)[1]
    post_preds = [row[:] for row in PREDS]
    post_preds[1][3] = 5
    post = S.answer_topk(one_hot_logits(post_preds), LABELS)[1]
    # Post is now *more* correct, but locality counts a changed prediction as a miss.
    assert S.agreement(pre, post) == 0.5
    assert S.agreement(pre, pre) == 1.0
    assert S.agreement(torch.zeros((0, 1), dtype=torch.long), torch.zeros((0, 1), dtype=torch.long)) is None


def test_topk_agreement_is_rank_by_rank_over_aligned_trailing_positions():
    pre = torch.tensor([[1, 2], [3, 4], [5, 0]])
    post = torch.tensor([[3, 4], [5, 1]])  # two trailing positions; ranks: 3=3, 4=4, 5=5, 1!=0
    assert S.topk_agreement(pre, post) == 0.75
    mask = torch.tensor([[0, 1, 1]])
    logits = torch.tensor([[[0., 0, 9], [0, 7, 3], [8, 1, 0]]])
    ids = S.sequence_topk(logits, mask, k=2)[0]
    assert ids.tolist() == [[1, 2], [0, 1]]


def test_decoupling_rates_by_hand():
    paired = [True, True, True, True, False, None]
    text = [True, False, False, True, True, True]
    image = [True, True, False, False, True, True]
    d = S.decoupling(paired, text, image)
    assert d.n == 5 and d.n_paired_success == 4
    assert d.dfr_text == 0.5  # cases 1, 2 fail text-only among 4 paired successes
    assert d.dfr_image == 0.5  # cases 2, 3
    assert d.joint_consistency == 0.2  # only case 0 of 5
    out = d.as_dict()
    assert out["decoupling_n"] == 5 and out["dfr_text"] == 0.5


def test_decoupling_nulls():
    none = S.decoupling([True, False], [None, None], [None, True])
    assert (none.dfr_text, none.dfr_image, none.joint_consistency, none.n) == (None, None, None, 0)
    no_hit = S.decoupling([False, False], [True, True], [True, False])
    assert no_hit.dfr_text is None and no_hit.dfr_image is None and no_hit.joint_consistency == 0.0
    with pytest.raises(ValueError, match="differ in length"):
        S.decoupling([True], [True, True], [True])


def test_aggregation_helpers():
    assert S.mean_or_none([1.0, None, 0.0, True]) == pytest.approx(2 / 3)
    assert S.mean_or_none([]) is None
    assert S.all_or_none([True, True]) is True
    assert S.all_or_none([True, False]) is False
    assert S.all_or_none([True, None]) is None and S.all_or_none([]) is None
    assert S.percentile([4, 1, 3, 2], 50) == 2.5
    assert S.percentile([0, 10], 90) == 9.0
    assert S.percentile([], 50) is None
