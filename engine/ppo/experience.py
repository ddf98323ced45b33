"""Step-3 experience: what PPO learns from, made from one batch of generated sequences.

`make_experience` runs the four roles on the sequences (actor and reference log-probs, critic values,
reward-model scores) and turns them into rewards, advantages and returns with `engine.rl.ppo`.
Every tensor is indexed by action (see `engine.rl.ppo`): position t is the action that produced
token t + 1.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, fields
from typing import Any

import torch

from engine.models.lm_head import token_logprobs, use_full_logits
from engine.models.load import position_ids
from engine.rl.ppo import answer_action_mask, compute_rewards, gae, logprobs_from_logits, masked_mean, whiten
from engine.rl.reward import end_scores


@dataclass
class Experience:
    sequences: torch.Tensor       # (B, T) prompt left-padded to width P, then the answer (right-padded)
    attention_mask: torch.Tensor  # (B, T) 1 on real tokens
    action_mask: torch.Tensor     # (B, T-1) 1 on actions that produced answer tokens
    logprobs: torch.Tensor        # (B, T-1) log pi_old(a_t | s_t), the actor at generation time
    ref_logprobs: torch.Tensor    # (B, T-1) log pi_ref(a_t | s_t)
    values: torch.Tensor          # (B, T-1) V_old(s_t), the critic at generation time
    scores: torch.Tensor          # (B,) reward-model score of each answer (raw, before normalising)
    rewards: torch.Tensor         # (B, T-1) -kl_coef * KL, plus the clipped score on the last action
    advantages: torch.Tensor      # (B, T-1) GAE advantages (whitened if asked)
    returns: torch.Tensor         # (B, T-1) value targets

    def select(self, index: torch.Tensor | slice) -> Experience:
        """The rows `index` of every field (for micro-batches)."""
        return Experience(**{f.name: getattr(self, f.name)[index] for f in fields(self)})

    def __len__(self) -> int:
        return self.sequences.shape[0]


def sequence_logprobs(model: Any, sequences: torch.Tensor, attention_mask: torch.Tensor, chunk_size: int | None = 0
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(log-probs (B, T-1) of each taken token, logits (B, T-1, V)) of a causal LM on `sequences`. Chunked
    (`chunk_size` > 0, or None: automatic; see `engine.models.lm_head.use_full_logits`), the log-probs come
    chunk by chunk and no logits are returned (None)."""
    if not use_full_logits(model, chunk_size):
        return token_logprobs(model, sequences, attention_mask, position_ids(attention_mask), chunk_size)[0], None
    logits = model(input_ids=sequences, attention_mask=attention_mask,
                   position_ids=position_ids(attention_mask)).logits[:, :-1]
    return logprobs_from_logits(logits, sequences[:, 1:]), logits


def critic_values(critic: Any, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) V(s_t): the critic's value at token t, the state before action t."""
    return critic(sequences, attention_mask)[:, :-1]


def reward_scores(reward: Any, sequences: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the reward model's score: its value at the last real token."""
    return end_scores(reward(sequences, attention_mask), attention_mask)


def sequence_masks(sequences: torch.Tensor, prompt_width: int, pad_id: int, eos_id: int,
                   prompt_mask: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(attention_mask (B, T), action_mask (B, T-1)) of generated sequences: real prompt tokens and the
    answer up to and including its first eos; what `generate` wrote after that is padding.

    `prompt_mask` (B, prompt_width), the prompts' own mask, is exact where a prompt token equals the
    pad id (pad = eos tokenizers); without it the prompt mask is rebuilt from the pad id."""
    action_mask = answer_action_mask(sequences, prompt_width, pad_id, eos_id)
    attention_mask = (sequences != pad_id).long()
    if prompt_mask is not None:
        attention_mask[:, :prompt_width] = prompt_mask
    attention_mask[:, prompt_width:] = action_mask[:, prompt_width - 1:]  # answer token t <- action t-1
    return attention_mask, action_mask


@torch.no_grad()
def make_experience(actor: Any, ref: Any, critic: Any, reward: Any, sequences: torch.Tensor, prompt_width: int,
                    pad_id: int, eos_id: int, *, kl_coef: float, clip_reward_value: float, gamma: float,
                    lam: float, kl_estimator: str = "k1", whiten_advantages: bool = False,
                    score_transform: Callable[[torch.Tensor], torch.Tensor] | None = None,
                    prompt_mask: torch.Tensor | None = None, logprob_chunk_size: int | None = 0
                    ) -> tuple[Experience, dict[str, torch.Tensor]]:
    """The experience of a batch of generated `sequences` (B, T), plus per-sequence statistics (B,):
    "score" (raw), "kl" (the estimator summed over the answer), "response_len", "value_mean" and
    "nonfinite" (1.0 where the score, a reward, an advantage or a return is NaN or inf).

    `score_transform` maps raw scores before they become rewards (e.g. running normalisation);
    `whiten_advantages` whitens advantages over the answer actions of the batch; `logprob_chunk_size` is
    `sequence_logprobs`'s `chunk_size`.
    """
    attention_mask, action_mask = sequence_masks(sequences, prompt_width, pad_id, eos_id, prompt_mask)
    logprobs, _ = sequence_logprobs(actor, sequences, attention_mask, logprob_chunk_size)
    ref_logprobs, _ = sequence_logprobs(ref, sequences, attention_mask, logprob_chunk_size)
    values = critic_values(critic, sequences, attention_mask).float() * action_mask
    scores = reward_scores(reward, sequences, attention_mask).float()
    shaped = score_transform(scores) if score_transform is not None else scores
    rewards, stats = compute_rewards(logprobs, ref_logprobs, shaped, action_mask, kl_coef, clip_reward_value,
                                     kl_estimator)
    advantages, returns = gae(rewards, values, action_mask, gamma, lam)
    if whiten_advantages:
        advantages = whiten(advantages, action_mask) * action_mask
    exp = Experience(sequences, attention_mask, action_mask, logprobs, ref_logprobs, values, scores, rewards,
                     advantages, returns)
    finite = (torch.isfinite(scores) & torch.isfinite(rewards).all(1) & torch.isfinite(advantages).all(1)
              & torch.isfinite(returns).all(1))
    return exp, {"score": scores, "kl": stats["kl"], "response_len": action_mask.sum(1).float(),
                 "value_mean": masked_mean(values, action_mask, dim=1), "nonfinite": (~finite).float()}


@torch.no_grad()
def make_critic_free_experience(actor: Any, ref: Any | None, sequences: torch.Tensor, attention_mask: torch.Tensor,
                                action_mask: torch.Tensor, rewards: torch.Tensor, *, estimator: str, group_size: int,
                                kl_coef: float, kl_estimator: str = "k1", baselines: torch.Tensor | None = None,
                                gamma: float = 1.0, std_normalize: bool = True,
                                batch_sum: Callable[[torch.Tensor], torch.Tensor] | None = None,
                                logprob_chunk_size: int | None = 0
                                ) -> tuple[Experience, dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """The experience of a critic-free estimator (`engine.rl.advantages`) on the rows of whole groups.

    Args: sequences, attention_mask (B, T) and action_mask (B, T-1) (`sequence_masks`, truncated answers
    already masked out if asked); rewards (B,) one outcome reward per answer (NaN: no score), rows ordered by
    group; the estimator's name, group size, baselines (B,) (remax); kl_coef / kl_estimator of the in-reward
    KL penalty (--kl_ctl; 0 or no reference: none); `batch_sum` sums statistics over the ranks (the batch-whitening
    estimators use it); `logprob_chunk_size` as in `sequence_logprobs`. `values` is zeros and `returns` the
    advantages (no critic).
    Returns the experience, per-sequence stats as `make_experience`'s, and the estimator's stats.
    """
    from engine.rl.advantages import get_estimator
    from engine.rl.ppo import kl_rewards

    logprobs, _ = sequence_logprobs(actor, sequences, attention_mask, logprob_chunk_size)
    ref_logprobs = (sequence_logprobs(ref, sequences, attention_mask, logprob_chunk_size)[0] if ref is not None
                    else logprobs)
    token_rewards, kl_stats = kl_rewards(logprobs, ref_logprobs, action_mask, kl_coef, kl_estimator)
    use_kl = ref is not None and kl_coef > 0
    advantages, adv_stats = get_estimator(estimator)(
        rewards, action_mask, group_size=group_size, token_rewards=token_rewards if use_kl else None,
        baselines=baselines, gamma=gamma, std_normalize=std_normalize, batch_sum=batch_sum)
    advantages = advantages.to(logprobs.dtype)
    zeros = torch.zeros_like(logprobs)
    exp = Experience(sequences, attention_mask, action_mask, logprobs, ref_logprobs, zeros, rewards,
                     token_rewards, advantages, advantages)
    finite = torch.isfinite(advantages).all(1) & torch.isfinite(token_rewards).all(1)
    # An unscored answer (NaN: every function returned None) counts as 0 in the score statistics.
    return exp, {"score": rewards.nan_to_num(0.0), "kl": kl_stats["kl"], "response_len": action_mask.sum(1).float(),
                 "value_mean": zeros[:, 0], "nonfinite": (~finite).float()}, adv_stats


def pad_experience(exp: Experience, length: int, pad_id: int) -> Experience:
    """`exp` with its sequences right-padded to `length` tokens (pad id, mask 0) and every per-action field to
    `length - 1` (zeros), so experiences of different generation calls can be stacked."""
    extra = length - exp.sequences.shape[1]
    if extra <= 0:
        return exp
    pad = torch.nn.functional.pad
    out = {f.name: pad(getattr(exp, f.name), (0, extra)) for f in fields(exp) if getattr(exp, f.name).dim() == 2}
    out["sequences"] = pad(exp.sequences, (0, extra), value=pad_id)
    return Experience(**{f.name: out.get(f.name, getattr(exp, f.name)) for f in fields(exp)})


def fill_with_groups(experiences: list[Experience], informative: list[torch.Tensor], group_size: int, rows: int,
                     pad_id: int) -> tuple[Experience, int]:
    """DAPO's dynamic sampling: one experience of `rows` rows made of the informative groups of `experiences`
    (in order; `informative[i]` (B_i,) bool per row), topped up with flat groups (zero advantage) when there are
    too few, so the step keeps its micro-batch layout. Returns it and the number of flat groups used to fill."""
    length = max(e.sequences.shape[1] for e in experiences)
    padded = [pad_experience(e, length, pad_id) for e in experiences]
    keep = torch.cat(informative)
    order = torch.cat([keep.nonzero().flatten(), (~keep).nonzero().flatten()])[:rows]
    stacked = Experience(**{f.name: torch.cat([getattr(e, f.name) for e in padded]) for f in fields(Experience)})
    flat_rows = int((~keep[order]).sum())
    return stacked.select(order), flat_rows // group_size
