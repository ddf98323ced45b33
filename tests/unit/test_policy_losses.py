"""KL as a loss and the policy-loss options (engine.rl.losses), values and gradients hand-worked."""
from __future__ import annotations

import math

import pytest
import torch

from engine.rl.losses import (
    GSPO_CLIP_HIGH,
    GSPO_CLIP_LOW,
    POLICY_LOSSES,
    aggregate_loss,
    gspo_policy_terms,
    kl_loss,
    ppo_policy_terms,
)
from engine.rl.ppo import policy_loss

LN2 = math.log(2.0)


@pytest.mark.parametrize("estimator, value, grad", [
    # logp = log 1/2, ref = log 1/4: r = ref - logp = -ln 2
    ("k1", LN2, 1.0),                        # -r; d/dlogp = 1
    ("k2", 0.5 * LN2 ** 2, LN2),             # r^2 / 2; d/dlogp = -r = ln 2
    ("k3", 0.5 - 1 + LN2, 0.5),              # e^r - 1 - r = 0.19315; d/dlogp = 1 - e^r = 1/2
    ("k3+", 0.5 - 1 + LN2, LN2),             # k3's value, k2's gradient
])
def test_kl_loss_values_and_gradients(estimator, value, grad):
    logp = torch.tensor([[math.log(0.5), math.log(0.5)]], requires_grad=True)
    ref = torch.tensor([[math.log(0.25), math.log(0.25)]])
    mask = torch.tensor([[1, 0]])  # the second action is no answer: value and gradient 0
    values, stats = kl_loss(logp, ref, mask, estimator)
    torch.testing.assert_close(values.detach(), torch.tensor([[value, 0.0]]))
    values.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[grad, 0.0]]))
    assert stats["kl"].item() == pytest.approx(value)


def test_kl_loss_refuses_an_unknown_estimator():
    with pytest.raises(ValueError, match="k3\\+"):
        kl_loss(torch.zeros(1, 1), torch.zeros(1, 1), torch.ones(1, 1), "k4")


def _ppo_case():
    # ratios (1.5, 0.5, 0.5, 4, 1) with advantages (1, 1, -1, -1, 1); the last action is no answer
    ratio = torch.tensor([[1.5, 0.5, 0.5, 4.0, 1.0]])
    old = torch.zeros(1, 5)
    logp = ratio.log().clone().requires_grad_(True)
    return logp, old, torch.tensor([[1.0, 1.0, -1.0, -1.0, 1.0]]), torch.tensor([[1, 1, 1, 1, 0]])


def test_asymmetric_and_dual_clip_hand_worked():
    logp, old, adv, mask = _ppo_case()
    terms, stats = ppo_policy_terms(logp, old, adv, mask, clip_low=0.2, clip_high=0.28, dual_clip_c=3.0)
    # t0: A 1, r 1.5: max(-1.5, -1.28) = -1.28, clipped high (no gradient)
    # t1: A 1, r 0.5: max(-0.5, -0.8) = -0.5 (gradient -A r = -0.5)
    # t2: A -1, r 0.5: max(0.5, 0.8) = 0.8, clipped low (no gradient)
    # t3: A -1, r 4: max(4, 1.28) = 4, over the dual bound -A c = 3: 3 (no gradient)
    torch.testing.assert_close(terms.detach(), torch.tensor([[-1.28, -0.5, 0.8, 3.0, 0.0]]))
    terms.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 0.0, 0.0, 0.0]]))
    assert stats["clipfrac_high"].item() == 0.25 and stats["clipfrac_low"].item() == 0.25
    assert stats["clipfrac"].item() == 0.5 and stats["clipfrac_dual"].item() == 0.25
    assert stats["ratio_mean"].item() == pytest.approx(1.625)  # (1.5 + 0.5 + 0.5 + 4) / 4
    assert stats["ratio_max"].item() == pytest.approx(4.0)


def test_without_dual_clip_a_negative_advantage_is_unbounded():
    logp, old, adv, mask = _ppo_case()
    terms, stats = ppo_policy_terms(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    # symmetric 0.2: t0 max(-1.5, -1.2) = -1.2; t3 keeps -A r = 4 and its gradient 4
    torch.testing.assert_close(terms.detach(), torch.tensor([[-1.2, -0.5, 0.8, 4.0, 0.0]]))
    terms.sum().backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, -0.5, 0.0, 4.0, 0.0]]))
    assert stats["clipfrac_dual"].item() == 0.0


def test_equal_clips_are_ppo_policy_loss():
    g = torch.Generator().manual_seed(0)
    logp, old = torch.randn(3, 6, generator=g) * 0.3, torch.randn(3, 6, generator=g) * 0.3
    adv = torch.randn(3, 6, generator=g)
    mask = torch.tensor([[0, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 1, 1, 0]])
    terms, stats = ppo_policy_terms(logp, old, adv, mask, clip_low=0.2, clip_high=0.2)
    expected, old_stats = policy_loss(logp, old, adv, mask, 0.2)
    torch.testing.assert_close(aggregate_loss(terms, mask, "token-mean")[0], expected)
    for key in ("clipfrac", "approx_kl", "ratio_max"):
        torch.testing.assert_close(stats[key], old_stats[key])


@pytest.mark.parametrize("kwargs", [{"dual_clip_c": 1.0}, {"clip_low": 1.0}, {"clip_high": -0.1}])
def test_bad_clip_settings_are_refused(kwargs):
    logp, old, adv, mask = _ppo_case()
    with pytest.raises(ValueError, match="must"):
        ppo_policy_terms(logp, old, adv, mask, **kwargs)


def test_gspo_uses_one_ratio_per_answer():
    # answer 0: log-ratios (0.2, 0.4) -> s = e^0.3 = 1.3499; answer 1: one action, log-ratio -0.1 -> s = e^-0.1
    old = torch.zeros(2, 3)
    logp = torch.tensor([[0.2, 0.4, 5.0], [0.0, -0.1, 0.0]], requires_grad=True)  # 5.0: not an answer action
    mask, adv = torch.tensor([[1, 1, 0], [0, 1, 0]]), torch.tensor([[1.0, 1.0, 0.0], [-1.0, -1.0, -1.0]])
    terms, stats = gspo_policy_terms(logp, old, adv, mask, clip_low=0.2, clip_high=0.4)
    s0, s1 = math.exp(0.3), math.exp(-0.1)
    torch.testing.assert_close(terms.detach(), torch.tensor([[-s0, -s0, 0.0], [0.0, s1, 0.0]]))
    assert stats["ratio_mean"].item() == pytest.approx((2 * s0 + s1) / 3)
    # seq-mean-token-mean of the token form has GSPO's sequence-level gradient: d(-A_i s_i)/dlogp_t = -A_i s_i / n_i,
    # over the 2 answers: answer 0 (-s0 / 2) / 2 per action, answer 1 (s1 / 1) / 2
    loss, _ = aggregate_loss(terms, mask, "seq-mean-token-mean")
    loss.backward()
    torch.testing.assert_close(logp.grad, torch.tensor([[-s0 / 4, -s0 / 4, 0.0], [0.0, s1 / 2, 0.0]]))


def test_gspo_clips_the_sequence_ratio_with_its_own_defaults():
    assert (GSPO_CLIP_LOW, GSPO_CLIP_HIGH) == (3e-4, 4e-4)
    logp, mask, adv = torch.tensor([[0.2, 0.4]], requires_grad=True), torch.ones(1, 2), torch.ones(1, 2)
    terms, stats = gspo_policy_terms(logp, torch.zeros(1, 2), adv, mask)
    # s = e^0.3 is over 1 + 4e-4: clipped to -1.0004 on both actions, no gradient
    torch.testing.assert_close(terms.detach(), torch.full((1, 2), -1.0004))
    assert stats["clipfrac_high"].item() == 1.0
    terms.sum().backward()
    assert logp.grad.abs().sum().item() == 0.0


def test_policy_loss_registry():
    assert POLICY_LOSSES == {"ppo": ppo_policy_terms, "gspo": gspo_policy_terms}
