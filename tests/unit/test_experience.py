"""Experience from generated sequences: shapes, left-padding invariance, reward placement, KL of a
policy against itself."""
from __future__ import annotations

import copy

import pytest
import torch

from engine.models.reward_model import RewardModel
from engine.ppo.experience import make_experience, sequence_logprobs
from engine.rl.ppo import score_position

PAD, EOS, VOCAB = 0, 1, 32


@pytest.fixture(scope="module")
def roles():
    from transformers import LlamaConfig, LlamaForCausalLM, LlamaForSequenceClassification

    cfg = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=VOCAB,
               pad_token_id=PAD, eos_token_id=EOS)
    torch.manual_seed(0)
    actor = LlamaForCausalLM(LlamaConfig(**cfg)).eval()
    critic = RewardModel(LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg))).eval()
    reward = RewardModel(LlamaForSequenceClassification(LlamaConfig(num_labels=1, **cfg))).eval()
    return actor, copy.deepcopy(actor), critic, reward


def test_logprobs_do_not_depend_on_left_padding(roles):
    actor = roles[0]
    alone = torch.tensor([[5, 6, 7, 8]])
    padded = torch.tensor([[PAD, PAD, 5, 6, 7, 8]])
    with torch.no_grad():
        lp_alone, _ = sequence_logprobs(actor, alone, torch.ones_like(alone))
        lp_padded, _ = sequence_logprobs(actor, padded, (padded != PAD).long())
    torch.testing.assert_close(lp_padded[:, 2:], lp_alone, rtol=1e-5, atol=1e-5)


def test_reward_model_scores_do_not_depend_on_left_padding(roles):
    reward = roles[3]
    right = torch.tensor([[5, 6, 7, PAD, PAD]])
    left = torch.tensor([[PAD, PAD, 5, 6, 7]])
    with torch.no_grad():
        a = reward.scores(right, (right != PAD).long())
        b = reward.scores(left, (left != PAD).long())
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_experience_of_the_reference_layout(roles):
    actor, ref, critic, reward = roles
    # two rows, prompts left-padded to width 4; row 0: [pad, pad, p0, p1, a0, a1, eos, pad]
    seqs = torch.tensor([[PAD, PAD, 11, 12, 21, 22, EOS, PAD],
                         [13, 14, 15, 16, 23, 24, 25, 26]])  # row 1: no eos, cut at the length limit
    exp, stats = make_experience(actor, ref, critic, reward, seqs, prompt_width=4, pad_id=PAD, eos_id=EOS,
                                 kl_coef=0.1, clip_reward_value=5.0, gamma=1.0, lam=0.95)
    assert exp.action_mask.tolist() == [[0, 0, 0, 1, 1, 1, 0], [0, 0, 0, 1, 1, 1, 1]]
    assert exp.attention_mask.tolist() == [[0, 0, 1, 1, 1, 1, 1, 0], [1] * 8]
    assert score_position(exp.action_mask).tolist() == [5, 6]
    # actor == reference: the KL penalty is zero, so the only reward is the clipped score on the last action
    expected = torch.zeros(2, 7)
    expected[0, 5], expected[1, 6] = exp.scores.clamp(-5, 5)
    torch.testing.assert_close(exp.rewards, expected)
    assert stats["kl"].tolist() == [0.0, 0.0] and stats["response_len"].tolist() == [3.0, 4.0]
    # nothing outside the answer
    outside = 1 - exp.action_mask
    assert (exp.advantages * outside).abs().sum() == 0 and (exp.values * outside).abs().sum() == 0
    assert len(exp.select(slice(0, 1))) == 1
