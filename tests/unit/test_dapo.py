"""DAPO's pure pieces (engine.rl.dapo), hand-worked."""
from __future__ import annotations

import pytest
import torch

from engine.rl.dapo import informative_groups, overlong_penalty, truncated_answers
from engine.rl.ppo import answer_action_mask

NAN = float("nan")


def _mask_of_lengths(lengths, width=12):
    """(B, width) action mask with each answer's actions at the end of a row (after prompt actions)."""
    return torch.stack([torch.arange(width) >= width - n for n in lengths]).long()


def test_overlong_penalty_hand_worked():
    mask = _mask_of_lengths([5, 6, 7, 8, 10])
    penalty, stats = overlong_penalty(mask, max_answer_len=10, buffer_len=4, penalty_factor=1.0)
    # free up to 10 - 4 = 6 tokens; then -(L - 6) / 4: 7 -> -0.25, 8 -> -0.5, 10 -> -1
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.25, -0.5, -1.0]))
    assert stats["frac_overlong"].item() == pytest.approx(0.6)
    penalty, _ = overlong_penalty(mask, max_answer_len=10, buffer_len=4, penalty_factor=0.5)
    torch.testing.assert_close(penalty, torch.tensor([0.0, 0.0, -0.125, -0.25, -0.5]))


@pytest.mark.parametrize("kwargs", [{"buffer_len": 0}, {"buffer_len": 11}, {"penalty_factor": -1.0}])
def test_overlong_penalty_refuses_bad_settings(kwargs):
    args = {"max_answer_len": 10, "buffer_len": 4, "penalty_factor": 1.0} | kwargs
    with pytest.raises(ValueError, match="overlong"):
        overlong_penalty(torch.ones(1, 3), **args)


@pytest.mark.parametrize("pad, eos", [(0, 9), (9, 9)])  # pad = eos tokenizers too
def test_truncated_answers(pad, eos):
    # prompts of width 3, left-padded, then 3 answer slots: [pad, p, p | a, eos, pad] ended;
    # [p, p, p | a, b, c] hit the limit; [pad, pad, p | eos, pad, pad] ended at once
    seqs = torch.tensor([[pad, 5, 6, 7, eos, pad], [4, 5, 6, 7, 8, 3], [pad, pad, 6, eos, pad, pad]])
    mask = answer_action_mask(seqs, prompt_width=3, pad_id=pad, eos_id=eos)
    truncated, stats = truncated_answers(seqs, mask, eos)
    assert truncated.tolist() == [False, True, False]
    assert stats["frac_truncated"].item() == pytest.approx(1 / 3)
    # masked out of the loss, the truncated answer has no action left; the others keep theirs
    kept = mask * ~truncated.unsqueeze(1)
    assert kept.sum(1).tolist() == [2, 0, 1]


def test_informative_groups():
    rewards = torch.tensor([1.0, 0.0, 1.0, 1.0, NAN, 0.5, 0.0, 0.0, 0.0, 2.0])
    keep, stats = informative_groups(rewards, group_size=2)
    # groups (1, 0) kept; (1, 1) all equal; (nan, 0.5) one score; (0, 0) all equal; (0, 2) kept
    assert keep.tolist() == [True, True, False, False, False, False, False, False, True, True]
    assert (stats["groups_kept"].item(), stats["groups_dropped"].item()) == (2, 3)
    with pytest.raises(ValueError, match="at least 2 answers"):
        informative_groups(rewards, group_size=1)
