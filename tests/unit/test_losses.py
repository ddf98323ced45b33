"""causal_lm_loss: hand-worked values, the next-token shift, ignored labels, fp32, the divisor
`token_count`, and micro-batch invariance of the token-weighted mean (with DeepSpeed's averaging over
micro-batches and ranks: tests/unit/test_batch_mean.py)."""
from __future__ import annotations

import math

import torch

from engine.rl.lm_loss import IGNORE_INDEX, causal_lm_loss, label_count

LN2, LN3 = math.log(2.0), math.log(3.0)
X = IGNORE_INDEX


def test_zero_logits_give_log_2():
    logits = torch.zeros(1, 3, 2)           # (B=1, T=3, V=2): softmax = [1/2, 1/2] everywhere
    labels = torch.tensor([[X, 0, 1]])
    loss, stats = causal_lm_loss(logits, labels)
    # positions 0 and 1 predict labels 0 and 1: -log(1/2) each -> mean ln 2 = 0.6931
    torch.testing.assert_close(loss, torch.tensor(LN2))
    torch.testing.assert_close(stats["loss_sum"], torch.tensor(2 * LN2))
    assert stats["tokens"].item() == 2


def test_hand_worked_1x3_vocab_2():
    logits = torch.tensor([[[0.0, LN3],       # softmax [1/4, 3/4]
                            [0.0, 0.0],       # softmax [1/2, 1/2]
                            [100.0, -100.0]]])  # the last position predicts nothing
    labels = torch.tensor([[X, 1, 0]])
    loss, stats = causal_lm_loss(logits, labels)
    # pos 0 -> token 1: -log(3/4) = ln(4/3) = 0.28768
    # pos 1 -> token 0: -log(1/2) = ln 2    = 0.69315
    # mean = (0.28768 + 0.69315) / 2 = ln(8/3) / 2 = 0.49041
    torch.testing.assert_close(loss, torch.tensor(math.log(8 / 3) / 2))
    torch.testing.assert_close(stats["loss_sum"], torch.tensor(math.log(8 / 3)))
    assert stats["tokens"].item() == 2


def test_position_t_predicts_token_t_plus_1():
    # Only labels[0, 2] is set, so only logits[0, 1] may matter.
    labels = torch.tensor([[X, X, 1]])
    logits = torch.tensor([[[5.0, -5.0],     # pos 0: would give ~10 if it were used for token 1
                            [0.0, LN3],      # pos 1: p(token 1) = 3/4 -> ln(4/3)
                            [LN3, 0.0]]])    # pos 2: p(token 1) = 1/4 -> ln 4 if unshifted
    loss, stats = causal_lm_loss(logits, labels)
    torch.testing.assert_close(loss, torch.tensor(math.log(4 / 3)))
    assert stats["tokens"].item() == 1
    # Changing every other position's logits leaves the loss as it is.
    other = logits.clone()
    other[0, 0] = torch.tensor([-7.0, 7.0])
    other[0, 2] = torch.tensor([9.0, -9.0])
    torch.testing.assert_close(causal_lm_loss(other, labels)[0], torch.tensor(math.log(4 / 3)))


def test_the_first_label_is_never_a_target():
    # labels[0] has no position before it to predict it.
    loss, stats = causal_lm_loss(torch.zeros(1, 3, 2), torch.tensor([[1, X, X]]))
    assert stats["tokens"].item() == 0
    assert loss.item() == 0.0  # 0 / max(0, 1): no NaN for a batch without labels


def test_ignored_labels_do_not_count():
    logits = torch.zeros(2, 3, 2)
    logits[1, 0] = torch.tensor([0.0, LN3])
    labels = torch.tensor([[X, X, X],      # row 0: nothing labelled
                           [X, 1, X]])     # row 1: pos 0 -> token 1, p = 3/4
    loss, stats = causal_lm_loss(logits, labels)
    # one token: ln(4/3); the fully ignored row neither adds loss nor dilutes the mean
    torch.testing.assert_close(loss, torch.tensor(math.log(4 / 3)))
    assert stats["tokens"].item() == 1


def test_token_count_divides_the_summed_loss():
    logits = torch.tensor([[[0.0, LN3],       # pos 0 -> token 1: ln(4/3)
                            [0.0, 0.0],       # pos 1 -> token 0: ln 2
                            [0.0, 0.0]]])
    labels = torch.tensor([[X, 1, 0]])
    loss, stats = causal_lm_loss(logits, labels, token_count=8.0)
    # (ln(4/3) + ln 2) / 8 = ln(8/3) / 8 = 0.12260, not the batch mean ln(8/3) / 2
    torch.testing.assert_close(loss, torch.tensor(math.log(8 / 3) / 8))
    torch.testing.assert_close(stats["loss_sum"], torch.tensor(math.log(8 / 3)))  # stats do not change
    assert stats["tokens"].item() == 2
    # a fractional count (a global count per micro-batch, engine.rl.batch_mean): 9 tokens / 4 micro-batches
    loss, _ = causal_lm_loss(logits, labels, token_count=2.25)
    torch.testing.assert_close(loss, torch.tensor(math.log(8 / 3) / 2.25))


def test_label_count_counts_the_targets_after_the_shift():
    labels = torch.tensor([[5, X, 3, 4],     # the first label is never a target: 2
                           [X, X, X, X],     # 0
                           [X, 1, 2, X]])    # 2
    assert label_count(labels).item() == 4 == causal_lm_loss(torch.zeros(3, 4, 6), labels)[1]["tokens"].item()


def test_fp32_flag_with_bf16_logits():
    logits = torch.zeros(1, 3, 2, dtype=torch.bfloat16)
    labels = torch.tensor([[X, 0, 1]])
    loss32, stats = causal_lm_loss(logits, labels, fp32=True)
    assert loss32.dtype == torch.float32
    torch.testing.assert_close(loss32, torch.tensor(LN2))
    assert stats["loss_sum"].dtype == torch.float32
    loss16, _ = causal_lm_loss(logits, labels, fp32=False)
    assert loss16.dtype == torch.bfloat16


def test_stats_are_detached():
    logits = torch.zeros(1, 3, 2, requires_grad=True)
    loss, stats = causal_lm_loss(logits, torch.tensor([[X, 0, 1]]))
    assert loss.requires_grad
    assert not stats["loss_sum"].requires_grad and not stats["tokens"].requires_grad


def _batches():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 5, 7, generator=g)
    labels = torch.randint(0, 7, (4, 5), generator=g)
    labels[0, 3:] = X          # row 0: 2 targets (positions 1, 2)
    labels[1, :] = X           # row 1: none
    labels[2, :2] = X          # row 2: 3 targets
    labels[3, 0] = X           # row 3: 4 targets
    return logits, labels


def test_token_weighted_mean_over_micro_batches_equals_the_full_batch():
    logits, labels = _batches()
    full, full_stats = causal_lm_loss(logits, labels)
    assert full_stats["tokens"].item() == 2 + 0 + 3 + 4

    _, s1 = causal_lm_loss(logits[:2], labels[:2])   # 2 tokens
    _, s2 = causal_lm_loss(logits[2:], labels[2:])   # 7 tokens
    weighted = (s1["loss_sum"] + s2["loss_sum"]) / (s1["tokens"] + s2["tokens"])
    torch.testing.assert_close(weighted, full)
    # ...whereas the plain mean of the two micro-batch means is a different number, so the check
    # above can fail.
    naive = (s1["loss_sum"] / s1["tokens"] + s2["loss_sum"] / s2["tokens"]) / 2
    assert not torch.isclose(naive, full)


def test_token_weighted_gradient_over_micro_batches_equals_the_full_batch():
    logits, labels = _batches()
    full_leaf = logits.clone().requires_grad_(True)
    causal_lm_loss(full_leaf, labels)[0].backward()

    split_leaf = logits.clone().requires_grad_(True)
    total = label_count(labels)
    for rows in (slice(0, 2), slice(2, 4)):
        loss, stats = causal_lm_loss(split_leaf[rows], labels[rows], token_count=total)   # as step 1 weights it
        loss.backward()
    torch.testing.assert_close(split_leaf.grad, full_leaf.grad)
    # ...whereas each micro-batch's own mean, accumulated (DeepSpeed-Chat), gives another gradient
    old_leaf = logits.clone().requires_grad_(True)
    for rows in (slice(0, 2), slice(2, 4)):
        (causal_lm_loss(old_leaf[rows], labels[rows])[0] / 2).backward()
    assert not torch.allclose(old_leaf.grad, full_leaf.grad)
