"""The critic-free advantage estimators (engine.rl.advantages), hand-worked on tiny literal tensors.

Masks are ragged and start with prompt positions (0), as step 3's are: an estimator that ignored the mask,
or let a group's baseline leak into another group, would fail these."""
from __future__ import annotations

import inspect
import math

import pytest
import torch

from engine.rl.advantages import (
    ADVANTAGE_ESTIMATORS,
    ESTIMATOR_NAMES,
    GROUP_ESTIMATORS,
    dr_grpo,
    flat_groups,
    get_estimator,
    grpo,
    reinforce_pp,
    reinforce_pp_baseline,
    remax,
    rloo,
)

NAN = float("nan")
S3 = math.sqrt(3.0)
# Four answers of one prompt then four of another; answers of 2, 3, 1 and 2 actions after prompt actions.
MASK = torch.tensor([[0, 1, 1, 0], [0, 1, 1, 1], [0, 0, 1, 0], [1, 1, 0, 0]] * 2)


def on_mask(values_per_row, mask=MASK):
    """(B, A): each row's value on its answer actions, 0 elsewhere."""
    return torch.tensor(values_per_row, dtype=torch.float32).unsqueeze(1) * mask


def test_grpo_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 2.0, 2.0, 2.0, 2.0])
    adv, stats = grpo(rewards, MASK, group_size=4)
    # group 1: mean 1/4; unbiased var (9/16 + 3 * 1/16) / 3 = 1/4, std 1/2 -> A = (3/4, -1/4, -1/4, -1/4) / (1/2)
    # group 2: all equal -> exactly 0, counted in frac_reward_zero_std (1 of 2 groups)
    torch.testing.assert_close(adv, on_mask([1.5, -0.5, -0.5, -0.5, 0, 0, 0, 0]))
    assert stats["frac_reward_zero_std"].item() == 0.5
    assert stats["advantage_min"].item() == -0.5 and stats["advantage_max"].item() == 1.5
    assert stats["reward_mean"].item() == pytest.approx(1.125)  # 9 / 8
    assert stats["reward_std"].item() == pytest.approx(torch.tensor([1.0, 0, 0, 0, 2, 2, 2, 2]).std().item())


def test_dr_grpo_does_not_divide_by_the_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, 1.0, 1.0])
    adv, _ = dr_grpo(rewards, MASK, group_size=4, std_normalize=True)  # ignored: Dr. GRPO never divides
    # group 1: r - 1/4; group 2: r - 6/4
    torch.testing.assert_close(adv, on_mask([0.75, -0.25, -0.25, -0.25, 1.5, -0.5, -0.5, -0.5]))
    torch.testing.assert_close(adv, grpo(rewards, MASK, group_size=4, std_normalize=False)[0])


def test_the_std_floor_keeps_a_nearly_constant_group_small():
    rewards, mask = torch.tensor([0.0, 1e-5]), torch.tensor([[1], [1]])
    # mean 5e-6, std 1e-5 / sqrt(2) = 7.07e-6: divided by it, A = -+0.707 from a difference of 1e-5;
    # with the floor 1e-3, A = -+5e-6 / 1e-3 = -+5e-3
    floored, _ = grpo(rewards, mask, group_size=2)
    torch.testing.assert_close(floored, torch.tensor([[-5e-3], [5e-3]]))
    raw, _ = grpo(rewards, mask, group_size=2, std_floor=0.0)
    torch.testing.assert_close(raw, torch.tensor([[-1 / math.sqrt(2)], [1 / math.sqrt(2)]]))


@pytest.mark.parametrize("name", sorted(GROUP_ESTIMATORS))
def test_group_estimators_refuse_one_answer_per_prompt(name):
    with pytest.raises(ValueError, match="at least 2 answers per prompt"):
        get_estimator(name)(torch.tensor([1.0, 0.0]), torch.ones(2, 3), group_size=1)
    with pytest.raises(ValueError, match="multiple of the group size"):
        get_estimator(name)(torch.tensor([1.0, 0.0, 1.0]), torch.ones(3, 3), group_size=2)


def test_unscored_answers_are_left_out_of_the_baseline_and_get_zero():
    rewards = torch.tensor([1.0, 0.0, NAN, 0.0, NAN, 3.0, NAN, NAN])
    adv, stats = grpo(rewards, MASK, group_size=4)
    # group 1 scores (1, 0, 0): mean 1/3, var ((2/3)^2 + 2 (1/3)^2) / 2 = 1/3 -> A = (2/3, -1/3, -1/3) * sqrt(3)
    # group 2 has one score: no baseline, zero, and counted as a group without spread
    torch.testing.assert_close(adv, on_mask([2 / S3, -1 / S3, 0, -1 / S3, 0, 0, 0, 0]))
    assert stats["frac_reward_zero_std"].item() == 0.5
    assert stats["frac_no_score"].item() == 0.5
    assert stats["reward_mean"].item() == pytest.approx(1.0)  # (1 + 0 + 0 + 3) / 4
    adv, _ = rloo(rewards, MASK, group_size=4)
    # leave-one-out over the scored siblings: 1 - 0, 0 - 1/2, 0 - 1/2
    torch.testing.assert_close(adv, on_mask([1.0, -0.5, 0, -0.5, 0, 0, 0, 0]))


def test_flat_groups():
    rewards = torch.tensor([1.0, 1.0, 0.0, 1.0, NAN, 2.0, NAN, NAN])
    assert flat_groups(rewards, 2).tolist() == [True, False, True, True]


def test_rloo_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0])
    adv, stats = rloo(rewards, MASK, group_size=4)
    # A_i = r_i - mean of the other three: group 1: 1 - 0, 0 - 1/3; group 2: 1 - 2/3, 0 - 1
    torch.testing.assert_close(adv, on_mask([1.0, -1 / 3, -1 / 3, -1 / 3, 1 / 3, 1 / 3, -1.0, 1 / 3]))
    assert stats["frac_reward_zero_std"].item() == 0.0


def test_group_estimators_add_the_kl_return_to_go():
    rewards, mask = torch.tensor([1.0, 0.0]), torch.tensor([[0, 1, 1], [0, 1, 0]])
    kl = torch.tensor([[9.0, -0.1, -0.2], [9.0, -0.4, 9.0]])  # the 9s lie outside the answers: ignored
    adv, _ = grpo(rewards, mask, group_size=2, token_rewards=kl)
    # outcome: mean 1/2, std 1/sqrt(2) -> +-1/sqrt(2); plus the KL return-to-go: row 0 (-0.3, -0.2), row 1 (-0.4)
    a = 1 / math.sqrt(2)
    torch.testing.assert_close(adv, torch.tensor([[0.0, a - 0.3, a - 0.2], [0.0, -a - 0.4, 0.0]]))


def test_reinforce_pp_hand_worked_with_one_answer_per_prompt():
    rewards, mask = torch.tensor([1.0, 0.0]), torch.tensor([[0, 1, 1], [0, 1, 0]])
    # gamma 0.5: returns row 0 (0.5 * 1, 1), row 1 (0); over the 3 answer actions mean 1/2,
    # unbiased var (0 + 1/4 + 1/4) / 2 = 1/4 -> whitened (0, 1, -1)
    adv, stats = reinforce_pp(rewards, mask, gamma=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0]]))
    assert "frac_reward_zero_std" not in stats  # no groups
    # gamma 1: returns (1, 1), (0): mean 2/3, var (2/9 + 4/9) / 2 = 1/3 -> (1/3, 1/3, -2/3) * sqrt(3)
    adv, _ = reinforce_pp(rewards, mask, gamma=1.0)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1 / S3, 1 / S3], [0.0, -2 / S3, 0.0]]))


def test_reinforce_pp_leaves_unscored_answers_out_of_the_whitening():
    rewards, mask = torch.tensor([1.0, 0.0, NAN]), torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 1]])
    adv, _ = reinforce_pp(rewards, mask, gamma=0.5)
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.0, 1.0], [0.0, -1.0, 0.0], [0.0, 0.0, 0.0]]))


def test_reinforce_pp_baseline_hand_worked():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0])
    mask = torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 1], [0, 0, 1]])
    adv, stats = reinforce_pp_baseline(rewards, mask, group_size=2)
    # group 1: r - mean = (1/2, -1/2); returns (1/2, 1/2), (-1/2); over those 3 actions mean 1/6,
    # var ((1/3)^2 + (1/3)^2 + (2/3)^2) / 2 = 1/3 -> (1/3, 1/3, -2/3) * sqrt(3). Group 2 is flat: 0, not whitened.
    torch.testing.assert_close(adv, torch.tensor([[0.0, 1 / S3, 1 / S3], [0.0, -2 / S3, 0.0],
                                                  [0.0, 0.0, 0.0], [0.0, 0.0, 0.0]]))
    assert stats["frac_reward_zero_std"].item() == 0.5


def test_remax_hand_worked():
    rewards, mask = torch.tensor([1.0, 0.0, 1.0]), torch.tensor([[0, 1, 1], [0, 1, 0], [1, 1, 0]])
    # A = r - r(greedy answer): 1 - 0.5, 0 - 0.5; no greedy score -> 0
    adv, _ = remax(rewards, mask, baselines=torch.tensor([0.5, 0.5, NAN]))
    torch.testing.assert_close(adv, torch.tensor([[0.0, 0.5, 0.5], [0.0, -0.5, 0.0], [0.0, 0.0, 0.0]]))
    with pytest.raises(ValueError, match="greedy answer"):
        remax(rewards, mask)


def test_group_advantages_do_not_depend_on_the_other_groups():
    # A rank computes its own whole groups: the same answers give the same advantages in any batch.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, NAN, 1.0])
    for name in ("grpo", "dr_grpo", "rloo", "remax"):
        fn, kw = get_estimator(name), {"group_size": 4, "baselines": torch.full((8,), 0.5)}
        whole, _ = fn(rewards, MASK, **kw)
        kw["baselines"] = torch.full((4,), 0.5)
        halves = torch.cat([fn(rewards[:4], MASK[:4], **kw)[0], fn(rewards[4:], MASK[4:], **kw)[0]])
        torch.testing.assert_close(halves, whole)


@pytest.mark.parametrize("name", ["reinforce_pp", "reinforce_pp_baseline"])
def test_batch_whitening_over_ranks_equals_whitening_the_whole_batch(name):
    # Two "ranks" each hold whole groups; `batch_sum` sums their statistics (as the trainer's all-reduce does).
    # Pass 1 records each rank's statistics; pass 2 gives each rank the sum, so each whitens with global moments.
    rewards = torch.tensor([1.0, 0.0, 0.0, 0.0, 3.0, 1.0, NAN, 1.0])
    fn, kw = get_estimator(name), {"group_size": 2, "gamma": 0.9}
    whole, _ = fn(rewards, MASK, **kw)
    parts = [(rewards[:4], MASK[:4]), (rewards[4:], MASK[4:])]
    seen = []
    for r, m in parts:
        fn(r, m, **kw, batch_sum=lambda t: seen.append(t) or t)
    total = seen[0] + seen[1]
    split = torch.cat([fn(r, m, **kw, batch_sum=lambda t: total)[0] for r, m in parts])
    torch.testing.assert_close(split, whole)
    # Without the sum each rank whitens its own part: other advantages (what the sum fixes).
    alone = torch.cat([fn(r, m, **kw)[0] for r, m in parts])
    assert not torch.allclose(alone, whole)


def test_the_registry():
    assert ESTIMATOR_NAMES == ("gae", "grpo", "dr_grpo", "rloo", "reinforce_pp", "reinforce_pp_baseline", "remax")
    signatures = {str(inspect.signature(fn)) for fn in ADVANTAGE_ESTIMATORS.values()}
    assert len(signatures) == 1, signatures  # one signature for all: the caller passes the same keywords
    with pytest.raises(ValueError, match="gae is PPO's"):
        get_estimator("gae")
    with pytest.raises(ValueError, match="choose one of grpo"):
        get_estimator("ppo")
