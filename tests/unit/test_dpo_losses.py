"""engine.rl.dpo: the answer's actions, per-sequence log-probs and each DPO-family loss, worked by hand."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.dpo import LOSSES, answer_actions, dpo_loss, nll_term, sequence_logps

# One pair used by most tests: policy chosen/rejected -1 / -3, reference -2 / -2.
# chosen log-ratio = -1 - (-2) = 1, rejected log-ratio = -3 - (-2) = -1, h = 1 - (-1) = 2.
PC, PR, RC, RR = (torch.tensor([v]) for v in (-1.0, -3.0, -2.0, -2.0))


def loss_of(loss_type: str, **kw) -> float:
    return float(dpo_loss(PC, PR, RC, RR, loss_type=loss_type, **kw)[0])


def test_answer_actions_mask_the_prompt_and_count_the_end_token():
    # Row 0: [p0, p1, a0, a1, eos, pad, pad], prompt 2 tokens: tokens 2, 3, 4 are the answer -> actions 1, 2, 3.
    # Row 1: [p0, p1, p2, a0, eos, pad, pad] where eos has the pad id (pad == eos): the attention mask, not the
    # id, says it is real, so it counts: tokens 3, 4 -> actions 2, 3.
    mask = torch.tensor([[1, 1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 0, 0]])
    actions = answer_actions(torch.tensor([2, 3]), mask)
    assert actions.tolist() == [[0, 1, 1, 1, 0, 0], [0, 0, 1, 1, 0, 0]]


def test_answer_actions_of_a_prompt_that_fills_the_row_are_empty():
    # Truncated to the prompt: no answer token, an all-zero mask (the row is kept, contributing log-prob 0).
    assert answer_actions(torch.tensor([4]), torch.ones(1, 4, dtype=torch.long)).tolist() == [[0, 0, 0]]


def test_sequence_logps_sum_mean_and_count():
    logprobs = torch.tensor([[-9.0, -1.0, -2.0, -3.0, -9.0, -9.0], [-9.0, -9.0, -9.0, -9.0, -9.0, -9.0]])
    mask = torch.tensor([[0.0, 1, 1, 1, 0, 0], [0.0, 0, 0, 0, 0, 0]])
    sums, means, counts = sequence_logps(logprobs, mask)
    # Row 0: -1 - 2 - 3 = -6 over 3 tokens, mean -2; row 1: empty, 0 / 0 / 0 (no NaN).
    assert sums.tolist() == [-6.0, 0.0] and means.tolist() == [-2.0, 0.0] and counts.tolist() == [3.0, 0.0]


def test_sigmoid_is_dpo_and_label_smoothing_is_cdpo():
    # beta 0.5: beta h = 1; -logsigmoid(1) = log(1 + e^-1) = 0.3132617.
    assert loss_of("sigmoid", beta=0.5) == pytest.approx(math.log1p(math.exp(-1)))
    # ls 0.2: 0.8 * 0.3132617 + 0.2 * -logsigmoid(-1) = 0.8 * 0.3132617 + 0.2 * 1.3132617 = 0.5132617.
    assert loss_of("sigmoid", beta=0.5, label_smoothing=0.2) == pytest.approx(0.5132617, abs=1e-6)


def test_ipo():
    # (h - 1 / (2 beta))^2: beta 0.5 -> (2 - 1)^2 = 1; beta 0.25 -> (2 - 2)^2 = 0.
    assert loss_of("ipo", beta=0.5) == pytest.approx(1.0)
    assert loss_of("ipo", beta=0.25) == pytest.approx(0.0)


def test_hinge():
    # relu(1 - beta h): beta 0.5 -> relu(0) = 0; beta 0.25 -> relu(0.5) = 0.5; a wrong order (h = -2) -> 2.
    assert loss_of("hinge", beta=0.5) == pytest.approx(0.0)
    assert loss_of("hinge", beta=0.25) == pytest.approx(0.5)
    assert float(dpo_loss(PR, PC, RR, RC, loss_type="hinge", beta=0.5)[0]) == pytest.approx(2.0)


def test_robust():
    # ((1 - ls) * -logsig(1) + ls * logsig(-1)) / (1 - 2 ls), ls 0.2:
    # (0.8 * 0.3132617 - 0.2 * 1.3132617) / 0.6 = (0.2506094 - 0.2626523) / 0.6 = -0.0200717.
    assert loss_of("robust", beta=0.5, label_smoothing=0.2) == pytest.approx(-0.0200717, abs=1e-6)
    assert loss_of("robust", beta=0.5) == pytest.approx(loss_of("sigmoid", beta=0.5))  # ls 0: plain DPO


def test_simpo_is_reference_free_and_length_normalised():
    # Mean log-probs -0.5 / -1.5, beta 2, gamma 0.5: z = 2 * (-0.5 + 1.5) - 0.5 = 1.5; -logsig(1.5) = 0.2014133.
    loss, stats = dpo_loss(torch.tensor([-0.5]), torch.tensor([-1.5]), None, None, loss_type="simpo", beta=2.0,
                           simpo_gamma=0.5)
    assert float(loss) == pytest.approx(math.log1p(math.exp(-1.5)))
    assert stats["chosen_rewards"].tolist() == [-1.0] and stats["rejected_rewards"].tolist() == [-3.0]


def test_rewards_accuracy_and_margin():
    # rewards = beta * log-ratio: 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5; chosen ahead: accuracy 1, margin 1.
    _, stats = dpo_loss(PC, PR, RC, RR, beta=0.5)
    assert stats["chosen_rewards"].tolist() == [0.5] and stats["rejected_rewards"].tolist() == [-0.5]
    assert stats["accuracies"].tolist() == [1.0] and stats["margins"].tolist() == [1.0]


def test_policy_equal_to_reference_gives_log_2():
    # Before training the policy is the reference: h = 0, loss = -logsigmoid(0) = log 2, rewards 0.
    x = torch.tensor([-4.0, -7.0])
    loss, stats = dpo_loss(x, x + 1, x, x + 1)
    assert float(loss) == pytest.approx(math.log(2)) and stats["margins"].tolist() == [0.0, 0.0]


def test_nll_term():
    # Chosen mean log-probs -1 and -3: NLL per pair 1 and 3, mean 2, times 0.5 = 1.
    assert float(nll_term(torch.tensor([-1.0, -3.0]), 0.5)) == pytest.approx(1.0)


def test_unknown_loss_and_missing_reference_are_errors():
    with pytest.raises(ValueError, match="unknown DPO loss"):
        dpo_loss(PC, PR, RC, RR, loss_type="kto")
    with pytest.raises(ValueError, match="needs the reference"):
        dpo_loss(PC, PR, None, None, loss_type="sigmoid")


@pytest.mark.parametrize("loss_type", LOSSES)
def test_two_micro_batches_give_the_batch_loss_and_gradient(loss_type):
    # Summed losses over pair_count = 4 in two halves == the mean over the 4 pairs, loss and gradient.
    torch.manual_seed(0)
    pc, pr, rc, rr = (torch.randn(4) for _ in range(4))
    whole = pc.clone().requires_grad_(True)
    loss, _ = dpo_loss(whole, pr, rc, rr, loss_type=loss_type, label_smoothing=0.1)
    loss.backward()
    split = pc.clone().requires_grad_(True)
    halves = [dpo_loss(split[s], pr[s], rc[s], rr[s], loss_type=loss_type, label_smoothing=0.1, pair_count=4)[0]
              for s in (slice(0, 2), slice(2, 4))]
    (halves[0] + halves[1]).backward()
    torch.testing.assert_close(halves[0] + halves[1], loss)
    torch.testing.assert_close(split.grad, whole.grad)
