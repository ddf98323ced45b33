"""Reward-model math, hand-worked. The score index has one owner: `last_real_index`."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.reward import (
    end_scores,
    last_real_index,
    pad_mask_with_leading,
    pairwise_loss,
    reward_loss,
    span_pairwise_loss,
)


def test_last_real_index_right_and_left_padding():
    mask = torch.tensor([[1, 1, 1, 0, 0],    # right-padded: last real token at 2
                         [0, 0, 1, 1, 1],    # left-padded: at 4
                         [1, 1, 1, 1, 1],    # no padding: at 4
                         [0, 0, 1, 1, 0]])   # both sides: at 3
    assert last_real_index(mask).tolist() == [2, 4, 4, 3]


def test_score_lands_on_eos_of_prompt_answer_eos_pad():
    # [pad, pad, p0, p1, a0, a1, eos, pad]: the score is the value at the eos, index 6.
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1, 0]])
    values = torch.arange(8.0).unsqueeze(0) * 10  # value at position t is 10 t
    assert last_real_index(mask).item() == 6
    assert end_scores(values, mask).item() == 60.0


def test_pad_mask_keeps_leading_pad_id_tokens():
    # OPT-style: BOS shares the pad id 2; the first token is real, the trailing 2s are padding.
    ids = torch.tensor([[2, 7, 8, 2, 2]])
    assert pad_mask_with_leading(ids, pad_id=2, num_padding_at_beginning=1).tolist() == [[1, 1, 1, 0, 0]]
    assert pad_mask_with_leading(ids, pad_id=2, num_padding_at_beginning=0).tolist() == [[0, 1, 1, 0, 0]]


def test_pairwise_loss_hand_worked():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # pair 1: -log sigmoid(1) = log(1 + e^-1) = 0.313262; pair 2: -log sigmoid(0) = log 2 = 0.693147
    loss, stats = pairwise_loss(chosen, rejected)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 2)
    assert stats["accuracy"].item() == 0.5  # 1 > 0 yes, 0 > 0 no
    assert stats["score_margin"].item() == 0.5


def test_pairwise_loss_margin_and_l2():
    chosen, rejected = torch.tensor([1.0]), torch.tensor([0.0])
    # margin 1: -log sigmoid(1 - 0 - 1) = log 2;  l2 0.5: + 0.5 * (1 + 0)^2 = 0.5
    loss, _ = pairwise_loss(chosen, rejected, margin=1.0, l2_coef=0.5)
    assert loss.item() == pytest.approx(math.log(2) + 0.5)


def test_span_loss_covers_first_difference_to_longer_end():
    # chosen  = [5, 6, 7, 8]  (length 4)     rejected = [5, 6, 9, pad] (length 3)
    # first difference at index 2; end = max(4, 3) = 4 -> span = positions 2 and 3.
    c_ids, r_ids = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 9, 0]])
    c_mask, r_mask = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0]])
    c_val = torch.tensor([[9.0, 9.0, 1.0, 2.0]])
    r_val = torch.tensor([[-9.0, -9.0, 1.0, 0.0]])
    # position 2: -log sigmoid(0) = log 2; position 3: -log sigmoid(2) = log(1 + e^-2)
    expected = (math.log(2) + math.log(1 + math.exp(-2))) / 2
    loss, stats = span_pairwise_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask)
    assert loss.item() == pytest.approx(expected)
    # end scores: chosen at index 3 (2.0), rejected at index 2 (1.0)
    assert stats["chosen_score"].item() == 2.0 and stats["rejected_score"].item() == 1.0


def test_span_loss_when_rejected_is_a_prefix():
    # chosen [5, 6, 7], rejected [5, 6, pad]: no differing id in the common part -> div = 2, end = 3.
    c_ids, r_ids = torch.tensor([[5, 6, 7]]), torch.tensor([[5, 6, 0]])
    c_mask, r_mask = torch.tensor([[1, 1, 1]]), torch.tensor([[1, 1, 0]])
    c_val, r_val = torch.tensor([[0.0, 0.0, 3.0]]), torch.zeros(1, 3)
    loss, _ = span_pairwise_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask)
    assert loss.item() == pytest.approx(math.log(1 + math.exp(-3)))


def test_reward_loss_splits_chosen_then_rejected():
    values = torch.tensor([[0.0, 2.0], [0.0, 1.0], [0.0, 0.0], [0.0, 1.0]])  # rows: c1, c2, r1, r2
    mask = torch.ones(4, 2, dtype=torch.long)
    ids = torch.tensor([[1, 2], [1, 3], [1, 4], [1, 5]])
    loss, stats = reward_loss(values, ids, mask, "end")
    direct, _ = pairwise_loss(torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0]))
    assert loss.item() == pytest.approx(direct.item())
    assert stats["accuracy"].item() == 0.5
    with pytest.raises(ValueError, match="unknown reward loss"):
        reward_loss(values, ids, mask, "hinge")


def test_pairwise_loss_is_invariant_to_splitting_the_batch():
    torch.manual_seed(0)
    c, r = torch.randn(8), torch.randn(8)
    whole, _ = pairwise_loss(c, r)
    halves = (pairwise_loss(c[:4], r[:4])[0] + pairwise_loss(c[4:], r[4:])[0]) / 2
    assert whole.item() == pytest.approx(halves.item())


def test_span_loss_of_a_batch_is_the_mean_of_its_pairs():
    # Two pairs of different lengths in one batch == each pair alone, averaged.
    c_ids = torch.tensor([[5, 6, 7, 8], [5, 9, 0, 0]])
    r_ids = torch.tensor([[5, 6, 9, 0], [5, 6, 7, 0]])
    c_mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]])
    r_mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 0]])
    torch.manual_seed(0)
    c_val, r_val = torch.randn(2, 4), torch.randn(2, 4)
    both, _ = span_pairwise_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask)
    each = [span_pairwise_loss(c_val[i:i + 1], r_val[i:i + 1], c_ids[i:i + 1], r_ids[i:i + 1], c_mask[i:i + 1],
                               r_mask[i:i + 1])[0] for i in range(2)]
    assert both.item() == pytest.approx((each[0].item() + each[1].item()) / 2)


def test_pair_count_divides_the_summed_pair_losses():
    chosen, rejected = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.0])
    # (log(1 + e^-1) + log 2) / 5 with pair_count 5 (the pairs of a whole window), not / 2
    loss, stats = pairwise_loss(chosen, rejected, pair_count=5.0)
    assert loss.item() == pytest.approx((math.log(1 + math.exp(-1)) + math.log(2)) / 5)
    assert stats["accuracy"].item() == 0.5  # the stats stay this batch's
    # the l2 term is a per-pair term too: margin 1 and l2 0.5 on one pair -> (log 2 + 0.5) / 4
    loss, _ = pairwise_loss(torch.tensor([1.0]), torch.tensor([0.0]), margin=1.0, l2_coef=0.5, pair_count=4.0)
    assert loss.item() == pytest.approx((math.log(2) + 0.5) / 4)


def test_span_pair_count_divides_the_summed_pair_losses():
    # The pair of test_span_loss_covers_first_difference_to_longer_end: its own span mean, over 3 pairs.
    c_ids, r_ids = torch.tensor([[5, 6, 7, 8]]), torch.tensor([[5, 6, 9, 0]])
    c_mask, r_mask = torch.tensor([[1, 1, 1, 1]]), torch.tensor([[1, 1, 1, 0]])
    c_val, r_val = torch.tensor([[9.0, 9.0, 1.0, 2.0]]), torch.tensor([[-9.0, -9.0, 1.0, 0.0]])
    loss, _ = span_pairwise_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask, pair_count=3.0)
    assert loss.item() == pytest.approx((math.log(2) + math.log(1 + math.exp(-2))) / 2 / 3)
    # with l2: + 0.1 * (2 + 1)^2 = 0.9 per pair, over the 3 pairs
    loss, _ = span_pairwise_loss(c_val, r_val, c_ids, r_ids, c_mask, r_mask, l2_coef=0.1, pair_count=3.0)
    assert loss.item() == pytest.approx(((math.log(2) + math.log(1 + math.exp(-2))) / 2 + 0.9) / 3)
