"""`aggregate_loss`'s four modes: hand-worked, then split invariance with ragged masks. One batch vs the same
batch in 2 micro-batches, on 2 ranks, and on 2 ranks x 2 micro-batches, combined as DeepSpeed does (the mean
over micro-batches and ranks of each piece's loss, `deepspeed_mean` of test_batch_mean): with the window's
global counts (`loss_counts` summed, through `mean_normaliser`) loss and gradient agree in every mode; with
each micro-batch's own counts they differ on the same data, so the test can fail."""
from __future__ import annotations

import pytest
import torch

from engine.rl.batch_mean import mean_normaliser
from engine.rl.losses import LOSS_AGG_MODES, aggregate_loss, loss_counts, ppo_policy_terms
from tests.unit.test_batch_mean import SPLITS, deepspeed_mean

TERMS = torch.tensor([[9.0, 1.0, 2.0], [3.0, 4.0, 5.0]])  # 9.0 is a prompt action: never counted
MASK_2 = torch.tensor([[0, 1, 1], [1, 1, 1]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", (1 + 2 + 3 + 4 + 5) / 5),                 # 15 / 5 answer actions = 3
    ("seq-mean-token-mean", ((1 + 2) / 2 + (3 + 4 + 5) / 3) / 2),  # (1.5 + 4) / 2 = 2.75
    ("seq-mean-token-sum", (3 + 12) / 2),                    # 7.5
    ("seq-mean-token-sum-norm", (3 / 4 + 12 / 4) / 2),       # constant 4: 1.875
])
def test_modes_hand_worked(mode, expected):
    loss, stats = aggregate_loss(TERMS, MASK_2, mode, constant=4)
    assert loss.item() == pytest.approx(expected)
    assert (stats["tokens"].item(), stats["seqs"].item()) == (5, 2)


def test_given_counts_are_the_divisors():
    # token-mean over a global 10 tokens split in 2 pieces: divisor 5 per piece; seq modes over 4 answers: 2
    assert aggregate_loss(TERMS, MASK_2, "token-mean", token_count=7.5)[0].item() == pytest.approx(15 / 7.5)
    assert aggregate_loss(TERMS, MASK_2, "seq-mean-token-sum", seq_count=3)[0].item() == pytest.approx(15 / 3)


def test_bad_modes_are_refused():
    with pytest.raises(ValueError, match="seq-mean-token-sum-norm"):
        aggregate_loss(TERMS, MASK_2, "sum")
    with pytest.raises(ValueError, match="constant > 0"):
        aggregate_loss(TERMS, MASK_2, "seq-mean-token-sum-norm")


def test_loss_counts():
    # the empty answer (e.g. masked out as truncated) counts in neither
    assert loss_counts(torch.tensor([[0, 1, 1], [0, 0, 0], [1, 1, 1]])) == (5, 2)


def _batch():
    """4 answers with ragged masks (2, 0, 5 and 1 actions after prompt actions), random PPO inputs."""
    g = torch.Generator().manual_seed(0)
    logprobs = torch.randn(4, 6, generator=g) * 0.3
    old, advantages = logprobs + torch.randn(4, 6, generator=g) * 0.2, torch.randn(4, 6, generator=g)
    mask = torch.tensor([[0, 0, 0, 0, 1, 1], [0, 0, 0, 0, 0, 0], [0, 1, 1, 1, 1, 1], [0, 0, 0, 1, 0, 0]])
    return logprobs, old, advantages, mask


def objective(leaf: torch.Tensor, mode: str, split, local: bool = False) -> torch.Tensor:
    """DeepSpeed's objective for `split`: the window's counts summed over all pieces (the all-reduce); `local`
    divides each piece by its own counts instead."""
    _, old, advantages, mask = _batch()
    micro, world = len(split[0]), len(split)
    tokens = sum(loss_counts(mask[rows])[0] for rank in split for rows in rank)
    seqs = sum(loss_counts(mask[rows])[1] for rank in split for rows in rank)
    counts = {} if local else {"token_count": mean_normaliser(tokens, micro, world),
                               "seq_count": mean_normaliser(seqs, micro, world)}

    def piece(rows):
        terms, _ = ppo_policy_terms(leaf[rows], old[rows], advantages[rows], mask[rows], clip_low=0.2, clip_high=0.28)
        return aggregate_loss(terms, mask[rows], mode, constant=6, **counts)[0]

    return deepspeed_mean([[piece(rows) for rows in rank] for rank in split])


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", [n for n in SPLITS if n != "whole"])
def test_loss_and_gradient_do_not_depend_on_the_split(mode, name):
    whole_leaf = _batch()[0].requires_grad_(True)
    whole = objective(whole_leaf, mode, SPLITS["whole"], local=True)  # one piece: its own counts are global
    whole.backward()
    split_leaf = _batch()[0].requires_grad_(True)
    split = objective(split_leaf, mode, SPLITS[name])
    split.backward()
    torch.testing.assert_close(split, whole)
    torch.testing.assert_close(split_leaf.grad, whole_leaf.grad)
    assert whole_leaf.grad.abs().sum() > 0


@pytest.mark.parametrize("mode", LOSS_AGG_MODES)
@pytest.mark.parametrize("name", [n for n in SPLITS if n != "whole"])
def test_each_pieces_own_counts_depend_on_the_split(mode, name):
    whole = objective(_batch()[0], mode, SPLITS["whole"], local=True)
    local = objective(_batch()[0], mode, SPLITS[name], local=True)
    assert abs(local.item() - whole.item()) > 1e-3
