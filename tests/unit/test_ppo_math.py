"""PPO math, hand-worked on tiny literal tensors (step 3 builds on these)."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.batch_mean import mean_normaliser
from engine.rl.ppo import (
    AdaptiveKLController,
    answer_action_mask,
    compute_rewards,
    entropy_from_logits,
    gae,
    kl_penalty,
    logprobs_from_logits,
    masked_mean,
    policy_loss,
    score_position,
    token_mean,
    value_loss,
    whiten,
)

# Sequence [pad, pad, p0, p1, a0, a1, eos, pad]: 8 tokens -> 7 actions; action t produces token t+1.
# Answer tokens a0, a1, eos are tokens 4, 5, 6 -> actions 3, 4, 5.
ACTION_MASK = torch.tensor([[0, 0, 0, 1, 1, 1, 0]])


def test_score_lands_on_the_action_that_produced_eos():
    assert score_position(ACTION_MASK).item() == 5


def test_kl_estimators():
    logp, ref = torch.tensor([math.log(0.5)]), torch.tensor([math.log(0.25)])
    r = math.log(0.25) - math.log(0.5)  # = -log 2
    assert kl_penalty(logp, ref, "k1").item() == pytest.approx(-r)              # log 2
    assert kl_penalty(logp, ref, "k2").item() == pytest.approx(0.5 * r * r)
    assert kl_penalty(logp, ref, "k3").item() == pytest.approx(math.exp(r) - 1 - r)  # 0.5 - 1 + log 2
    with pytest.raises(ValueError, match="unknown KL estimator"):
        kl_penalty(logp, ref, "k4")


def test_compute_rewards_hand_worked():
    logp = torch.tensor([[0.0, 0.0, 0.0, -1.0, -1.0, -1.0, 0.0]])
    ref = torch.tensor([[0.0, 0.0, 0.0, -1.5, -1.0, -0.5, 0.0]])
    # k1 = logp - ref on answer actions: [0.5, 0, -0.5]; reward = -0.1 * k1 = [-0.05, 0, 0.05]
    # score 7 clipped to 5, added at action 5: 0.05 + 5 = 5.05
    rewards, stats = compute_rewards(logp, ref, torch.tensor([7.0]), ACTION_MASK, kl_coef=0.1, clip_reward_value=5)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, 0.0, 0.0, -0.05, 0.0, 5.05, 0.0]]))
    assert stats["kl"].item() == pytest.approx(0.0)  # 0.5 + 0 - 0.5
    assert stats["score_clipped"].tolist() == [5.0]


def test_empty_answer_gets_no_score():
    rewards, _ = compute_rewards(torch.zeros(1, 3), torch.zeros(1, 3), torch.tensor([3.0]),
                                 torch.zeros(1, 3, dtype=torch.long), kl_coef=0.1, clip_reward_value=5)
    assert rewards.abs().sum().item() == 0.0


def test_gae_hand_worked():
    # Two answer actions after one prompt action. rewards [_, 0, 1], values [_, 0.5, 0.25]
    mask = torch.tensor([[0, 1, 1]])
    rewards = torch.tensor([[9.0, 0.0, 1.0]])   # the prompt-position reward is ignored
    values = torch.tensor([[9.0, 0.5, 0.25]])
    gamma, lam = 1.0, 0.95
    # t=2: delta = 1 + 0 - 0.25 = 0.75; A2 = 0.75
    # t=1: delta = 0 + 0.25 - 0.5 = -0.25; A1 = -0.25 + 0.95 * 0.75 = 0.4625
    adv, ret = gae(rewards, values, mask, gamma, lam)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.4625, 0.75]]))
    torch.testing.assert_close(ret, torch.tensor([[0.0, 0.9625, 1.0]]))


def test_gae_ignores_values_after_the_answer():
    mask = torch.tensor([[1, 1, 0]])
    adv, _ = gae(torch.tensor([[0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 100.0]]), mask, 1.0, 1.0)
    torch.testing.assert_close(adv, torch.tensor([[1.0, 1.0, 0.0]]))


def test_policy_loss_clipping_hand_worked():
    mask = torch.tensor([[1, 1]])
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(0.5)]])  # ratios 1.5 and 0.5
    adv = torch.tensor([[1.0, -1.0]])
    # action 0: max(-1*1.5, -1*1.2) = -1.2 (clipped);  action 1: max(1*0.5, 1*0.8) = 0.8 (clipped)
    loss, stats = policy_loss(new, old, adv, mask, cliprange=0.2)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 2)
    assert stats["clipfrac"].item() == 1.0
    # approx_kl: (1.5 - 1 - log 1.5 + 0.5 - 1 - log 0.5) / 2
    assert stats["approx_kl"].item() == pytest.approx((0.5 - math.log(1.5) - 0.5 - math.log(0.5)) / 2)


def test_policy_loss_is_advantage_weighted_logprob_at_ratio_one():
    new = torch.tensor([[-1.0, -2.0]], requires_grad=True)
    loss, stats = policy_loss(new, new.detach(), torch.tensor([[2.0, -1.0]]), torch.ones(1, 2), 0.2)
    loss.backward()
    # d/dlogp of -A * exp(logp - old) at ratio 1 = -A, averaged over 2 actions
    torch.testing.assert_close(new.grad, torch.tensor([[-1.0, 0.5]]))
    assert stats["clipfrac"].item() == 0.0


def test_value_loss_hand_worked():
    mask = torch.tensor([[1, 1]])
    values, old, returns = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 0.0]]), torch.tensor([[2.0, 1.0]])
    # action 0: V clipped to 0.2: max((1-2)^2, (0.2-2)^2) = 3.24; action 1: max(1, 1) = 1
    loss, stats = value_loss(values, old, returns, mask, cliprange_value=0.2)
    assert loss.item() == pytest.approx(0.5 * (3.24 + 1.0) / 2)
    assert stats["vf_clipfrac"].item() == 0.5


def test_whiten_and_masked_mean():
    x = torch.tensor([1.0, 2.0, 3.0, 100.0])
    mask = torch.tensor([1, 1, 1, 0])
    assert masked_mean(x, mask).item() == 2.0
    w = whiten(x, mask)
    assert masked_mean(w, mask).item() == pytest.approx(0.0, abs=1e-6)
    torch.testing.assert_close(w[:3], torch.tensor([-1.0, 0.0, 1.0]))  # unbiased std of 1, 2, 3 is 1
    assert masked_mean(whiten(x, mask, shift_mean=False), mask).item() == pytest.approx(2.0)


def test_logprobs_and_entropy_of_uniform_logits():
    logits = torch.zeros(1, 2, 4)
    torch.testing.assert_close(logprobs_from_logits(logits, torch.tensor([[1, 3]])), torch.full((1, 2), -math.log(4)))
    torch.testing.assert_close(entropy_from_logits(logits), torch.full((1, 2), math.log(4)))


def test_adaptive_kl_controller():
    ctl = AdaptiveKLController(0.1, target=6.0, horizon=10000)
    # kl 12: error = clip(12/6 - 1, -.2, .2) = 0.2; coef = 0.1 * (1 + 0.2 * 100 / 10000) = 0.1002
    assert ctl.update(12.0, n_steps=100) == pytest.approx(0.1002)
    fixed = AdaptiveKLController(0.1)
    assert fixed.update(100.0, 100) == 0.1
    restored = AdaptiveKLController(0.5)
    restored.load_state_dict(ctl.state_dict())
    assert restored.coef == ctl.coef and restored.target == 6.0


def test_token_count_divides_the_masked_sums():
    x, mask = torch.tensor([1.0, 2.0, 3.0, 100.0]), torch.tensor([1, 1, 1, 0])
    assert token_mean(x, mask).item() == masked_mean(x, mask).item() == 2.0
    assert token_mean(x, mask, token_count=4.0).item() == 6.0 / 4.0
    # test_policy_loss_clipping_hand_worked's actions (-1.2 and 0.8) over a window of 5 tokens
    new, old = torch.tensor([[math.log(1.5), math.log(0.5)]]), torch.zeros(1, 2)
    loss, stats = policy_loss(new, old, torch.tensor([[1.0, -1.0]]), torch.tensor([[1, 1]]), 0.2, token_count=5.0)
    assert loss.item() == pytest.approx((-1.2 + 0.8) / 5)
    assert stats["clipfrac"].item() == pytest.approx(2 / 5)   # 2 of the window's 5 tokens
    # test_value_loss_hand_worked's actions (3.24 and 1) over 8 tokens
    vl, v_stats = value_loss(torch.tensor([[1.0, 0.0]]), torch.zeros(1, 2), torch.tensor([[2.0, 1.0]]),
                             torch.tensor([[1, 1]]), 0.2, token_count=8.0)
    assert vl.item() == pytest.approx(0.5 * (3.24 + 1.0) / 8)
    assert v_stats["vf_clipfrac"].item() == pytest.approx(1 / 8)


def deepspeed_mean(losses_by_rank: list[list[torch.Tensor]]) -> torch.Tensor:
    """The objective of DeepSpeed's update (engine/rl/batch_mean.py): each loss / gas, summed, averaged over ranks."""
    ranks, gas = len(losses_by_rank), len(losses_by_rank[0])
    return sum(sum(loss / gas for loss in rank) for rank in losses_by_rank) / ranks


def _ragged_rollout():
    """4 answers of 2, 1, 0 and 4 actions in (4, 5) tensors."""
    g = torch.Generator().manual_seed(0)
    mask = torch.tensor([[0, 0, 1, 1, 0], [0, 0, 0, 1, 0], [0, 0, 0, 0, 0], [0, 1, 1, 1, 1]])
    old, adv = torch.randn(4, 5, generator=g) * 0.3, torch.randn(4, 5, generator=g)
    logp = old + torch.randn(4, 5, generator=g) * 0.3   # ratios on both sides of the clip range
    values, old_values, returns = (torch.randn(4, 5, generator=g) for _ in range(3))
    return logp, old, adv, mask, values, old_values, returns


# One batch; 2 micro-batches; 2 ranks; 2 ranks x 2 micro-batches (rows dealt out as DistributedSampler does).
SPLITS = {"whole": [[[0, 1, 2, 3]]], "2 micro-batches": [[[0, 1], [2, 3]]], "2 ranks": [[[0, 1]], [[2, 3]]],
          "2 ranks x 2 micro-batches": [[[0], [2]], [[1], [3]]]}


def ppo_objective(logp, values, split, old_mean: bool = False) -> torch.Tensor:
    """Policy + value loss of the ragged rollout as the trainer weights it: the window's action count,
    all-reduced, over micro-batches x ranks; `old_mean`: each micro-batch's own mean (DeepSpeed-Chat)."""
    _, old, adv, mask, _, old_values, returns = _ragged_rollout()
    tokens = sum(float(mask[rows].sum()) for rank in split for rows in rank)
    count = None if old_mean else mean_normaliser(tokens, len(split[0]), len(split))
    losses = [[policy_loss(logp[r], old[r], adv[r], mask[r], 0.2, count)[0]
               + value_loss(values[r], old_values[r], returns[r], mask[r], 0.2, count)[0] for r in rank]
              for rank in split]
    return deepspeed_mean(losses)


@pytest.mark.parametrize("name", list(SPLITS))
def test_ppo_losses_and_gradients_do_not_depend_on_the_split(name):
    logp, _, _, _, values, _, _ = _ragged_rollout()
    full_logp, full_values = logp.clone().requires_grad_(True), values.clone().requires_grad_(True)
    full = ppo_objective(full_logp, full_values, SPLITS["whole"])  # the batch means over its 7 actions
    full.backward()
    split_logp, split_values = logp.clone().requires_grad_(True), values.clone().requires_grad_(True)
    loss = ppo_objective(split_logp, split_values, SPLITS[name])
    loss.backward()
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(split_logp.grad, full_logp.grad)
    torch.testing.assert_close(split_values.grad, full_values.grad)
    assert full_logp.grad.abs().sum() > 0 and full_values.grad.abs().sum() > 0


def test_ppo_old_per_micro_batch_mean_depends_on_the_split():
    logp, _, _, _, values, _, _ = _ragged_rollout()
    whole = ppo_objective(logp, values, SPLITS["whole"], old_mean=True)
    for name in ("2 micro-batches", "2 ranks x 2 micro-batches"):
        assert not torch.isclose(ppo_objective(logp, values, SPLITS[name], old_mean=True), whole)


def test_answer_action_mask_on_the_reference_layout():
    # [pad, pad, p0, p1, a0, a1, eos, pad] with prompts left-padded to width 4 (pad 0, eos 9)
    seq = torch.tensor([[0, 0, 11, 12, 21, 22, 9, 0]])
    mask = answer_action_mask(seq, prompt_width=4, pad_id=0, eos_id=9)
    assert mask.tolist() == ACTION_MASK.tolist() == [[0, 0, 0, 1, 1, 1, 0]]
    assert score_position(mask).item() == 5  # the action that produced the eos


def test_answer_action_mask_when_pad_is_eos():
    # pad == eos == 9: the first 9 after the prompt ends the answer, the rest is padding
    seq = torch.tensor([[9, 11, 12, 21, 9, 9]])
    assert answer_action_mask(seq, prompt_width=3, pad_id=9, eos_id=9).tolist() == [[0, 0, 1, 1, 0]]


def test_answer_action_mask_without_eos_keeps_every_answer_token():
    seq = torch.tensor([[11, 12, 21, 22]])  # cut at max length, no eos
    assert answer_action_mask(seq, prompt_width=2, pad_id=0, eos_id=9).tolist() == [[0, 1, 1]]


def test_an_all_empty_batch_gives_zero_finite_losses_and_gradients():
    # A rank whose answers are all empty still runs its updates (so no rank waits for it): zero loss.
    logp = torch.zeros(2, 3, requires_grad=True)
    values = torch.zeros(2, 3, requires_grad=True)
    mask = torch.zeros(2, 3)
    pg, _ = policy_loss(logp, logp.detach(), torch.ones(2, 3), mask, cliprange=0.2)
    vl, _ = value_loss(values, values.detach(), torch.ones(2, 3), mask, cliprange_value=0.2)
    (pg + vl).backward()
    assert pg.item() == 0.0 and vl.item() == 0.0
    assert torch.isfinite(logp.grad).all() and logp.grad.abs().sum() == 0 and values.grad.abs().sum() == 0
