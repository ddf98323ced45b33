"""`mean_normaliser`, the step-1 and step-2 loss scaling: with it, DeepSpeed's update (the mean over
micro-batches and ranks of the micro-batch losses) is the mean over the global batch, however the batch
is split; DeepSpeed-Chat's per-micro-batch mean is not (each test shows it differs on the same data).

`deepspeed_mean` is what DeepSpeed 0.19.8 does with the losses of one optimizer step: engine.backward
divides each by gradient_accumulation_steps, the micro-batch gradients add up, and the gradient
reduction averages over the data-parallel ranks (see engine/rl/batch_mean.py)."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.batch_mean import mean_normaliser
from engine.rl.lm_loss import IGNORE_INDEX, causal_lm_loss, label_count
from engine.rl.reward import reward_loss

X = IGNORE_INDEX


def deepspeed_mean(losses_by_rank: list[list[torch.Tensor]]) -> torch.Tensor:
    """(1 / ranks) * sum over ranks of (1 / gas) * sum over micro-batches: the objective whose gradient
    DeepSpeed applies (every rank has the same number of micro-batches, gas)."""
    ranks, gas = len(losses_by_rank), len(losses_by_rank[0])
    assert all(len(r) == gas for r in losses_by_rank)
    return sum(sum(loss / gas for loss in rank) for rank in losses_by_rank) / ranks


def test_mean_normaliser_hand_worked():
    assert mean_normaliser(9, micro_batches=2, world_size=2) == 9 / 4
    assert mean_normaliser(9, micro_batches=1, world_size=1) == 9.0
    assert mean_normaliser(0, micro_batches=4, world_size=2) == 1 / 8  # no tokens: sums are 0, no 0 / 0
    with pytest.raises(ValueError):
        mean_normaliser(9, micro_batches=0, world_size=1)


def test_step1_hand_worked_two_micro_batches():
    # micro-batch 1: one target with p = 3/4 -> ln(4/3); micro-batch 2: two targets with p = 1/2 -> ln 2 each.
    l1, y1 = torch.tensor([[[0.0, math.log(3.0)], [0.0, 0.0]]]), torch.tensor([[X, 1]])
    l2, y2 = torch.zeros(1, 3, 2), torch.tensor([[X, 0, 1]])
    norm = mean_normaliser(3, micro_batches=2, world_size=1)  # 3 tokens over 2 micro-batches: 1.5
    step1 = deepspeed_mean([[causal_lm_loss(l1, y1, token_count=norm)[0], causal_lm_loss(l2, y2, token_count=norm)[0]]])
    # (1/2) * (ln(4/3) / 1.5 + 2 ln 2 / 1.5) = (ln(4/3) + 2 ln 2) / 3 = 0.55799, the mean over the 3 tokens
    assert step1.item() == pytest.approx((math.log(4 / 3) + 2 * math.log(2)) / 3)
    # DeepSpeed-Chat's per-micro-batch mean: (ln(4/3) + ln 2) / 2 = 0.49041
    old = deepspeed_mean([[causal_lm_loss(l1, y1)[0], causal_lm_loss(l2, y2)[0]]])
    assert old.item() == pytest.approx((math.log(4 / 3) + math.log(2)) / 2)


def _lm_batch():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 6, 7, generator=g)
    labels = torch.randint(0, 7, (4, 6), generator=g)
    labels[0, 3:] = X          # row 0: 2 targets
    labels[1, :] = X           # row 1: none
    labels[2, :2] = X          # row 2: 4 targets
    labels[3, 0] = X           # row 3: 5 targets
    return logits, labels


# Rows of each micro-batch, per rank: one batch; 2 micro-batches; 2 ranks x 1; 2 ranks x 2 micro-batches of one
# row, interleaved as DistributedSampler deals them out.
SPLITS = {"whole": [[[0, 1, 2, 3]]], "2 micro-batches": [[[0, 1], [2, 3]]], "2 ranks": [[[0, 1]], [[2, 3]]],
          "2 ranks x 2 micro-batches": [[[0], [2]], [[1], [3]]]}


def lm_objective(logits: torch.Tensor, labels: torch.Tensor, split, old: bool = False) -> torch.Tensor:
    """Step 1's objective for `split`: each rank counts the window's tokens, all-reduced; `old` is DeepSpeed-Chat's."""
    global_tokens = sum(float(label_count(labels[rows])) for rank in split for rows in rank)
    norm = mean_normaliser(global_tokens, len(split[0]), len(split))
    return deepspeed_mean([[causal_lm_loss(logits[rows], labels[rows], token_count=None if old else norm)[0]
                            for rows in rank] for rank in split])


@pytest.mark.parametrize("name", list(SPLITS))
def test_step1_loss_and_gradient_do_not_depend_on_the_split(name):
    logits, labels = _lm_batch()
    full_leaf = logits.clone().requires_grad_(True)
    full, _ = causal_lm_loss(full_leaf, labels)   # the token mean over the 11 targets of the batch
    full.backward()
    leaf = logits.clone().requires_grad_(True)
    loss = lm_objective(leaf, labels, SPLITS[name])
    loss.backward()
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(leaf.grad, full_leaf.grad)


def test_step1_old_per_micro_batch_mean_depends_on_the_split():
    logits, labels = _lm_batch()
    whole = lm_objective(logits, labels, SPLITS["whole"], old=True)
    split = lm_objective(logits, labels, SPLITS["2 ranks x 2 micro-batches"], old=True)
    assert not torch.isclose(whole, split)


def _pair_batch():
    """(2B, T) values, ids, masks of 6 pairs: chosen rows 0-5, rejected rows 6-11 (right-padded, ragged)."""
    g = torch.Generator().manual_seed(1)
    values = torch.randn(12, 6, generator=g)
    ids = torch.randint(3, 9, (12, 6), generator=g)
    lengths = torch.tensor([6, 3, 5, 2, 4, 6, 4, 3, 6, 4, 2, 5])
    mask = (torch.arange(6).unsqueeze(0) < lengths.unsqueeze(1)).long()
    ids[:, 0] = 1  # every pair shares its first token, so the span starts later
    return values, ids * mask, mask


def pair_rows(pairs: list[int]) -> list[int]:
    return pairs + [p + 6 for p in pairs]


# A window whose last micro-batch is short (the loader keeps a short last batch: 6 pairs in batches of 4
# and 2, or of 2 per rank in 2 + 1); and equal micro-batches, where a mean of micro-batch means is the mean.
PAIR_SPLITS = {"whole": [[[0, 1, 2, 3, 4, 5]]], "4 + 2 pairs": [[[0, 1, 2, 3], [4, 5]]],
               "2 ranks x (2 + 1 pairs)": [[[0, 2], [4]], [[1, 3], [5]]],
               "2 ranks x 3 micro-batches of 1": [[[0], [2], [4]], [[1], [3], [5]]]}


def reward_objective(values, ids, mask, split, kind: str, old: bool = False) -> torch.Tensor:
    pairs = sum(len(rows) for rank in split for rows in rank)
    norm = mean_normaliser(pairs, len(split[0]), len(split))
    losses = []
    for rank in split:
        losses.append([])
        for rows in rank:
            r = pair_rows(rows)
            loss, _ = reward_loss(values[r], ids[r], mask[r], kind, margin=0.1, l2_coef=0.01,
                                  pair_count=None if old else norm)
            losses[-1].append(loss)
    return deepspeed_mean(losses)


@pytest.mark.parametrize("kind", ["end", "span"])
@pytest.mark.parametrize("name", list(PAIR_SPLITS))
def test_step2_loss_and_gradient_do_not_depend_on_the_split(kind, name):
    values, ids, mask = _pair_batch()
    full_leaf = values.clone().requires_grad_(True)
    full, _ = reward_loss(full_leaf, ids, mask, kind, margin=0.1, l2_coef=0.01)  # the mean over the 6 pairs
    full.backward()
    leaf = values.clone().requires_grad_(True)
    loss = reward_objective(leaf, ids, mask, PAIR_SPLITS[name], kind)
    loss.backward()
    torch.testing.assert_close(loss, full)
    torch.testing.assert_close(leaf.grad, full_leaf.grad)


@pytest.mark.parametrize("kind", ["end", "span"])
def test_step2_old_mean_of_micro_batch_means_is_invariant_only_for_equal_pair_counts(kind):
    values, ids, mask = _pair_batch()
    whole = reward_objective(values, ids, mask, PAIR_SPLITS["whole"], kind, old=True)
    equal = reward_objective(values, ids, mask, PAIR_SPLITS["2 ranks x 3 micro-batches of 1"], kind, old=True)
    torch.testing.assert_close(equal, whole)  # one pair per micro-batch: a mean of means is the mean
    for ragged in ("4 + 2 pairs", "2 ranks x (2 + 1 pairs)"):
        assert not torch.isclose(reward_objective(values, ids, mask, PAIR_SPLITS[ragged], kind, old=True), whole)
