"""PPO math for step 3 as pure tensor functions (torch only): KL penalties, reward placement, GAE,
whitening, the clipped policy and value losses, entropy, and the adaptive KL controller.

Index conventions (each has one owner here):
- Positions are "actions": for a sequence `seq` of length T, position t of a (B, T-1) tensor is the
  action that produced token t + 1, i.e. `logprobs[:, t] = log pi(seq[t+1] | seq[:t+1])`.
- `action_mask` (B, T-1) is 1 where token t + 1 is a generated answer token (including its eos) and 0
  on the prompt and on padding.
- The scalar reward-model score lands on the last action with mask 1 (`score_position`): the action
  that produced the answer's last real token. DeepSpeed-Chat put it one slot later, on the action
  predicting the first pad (its PR #672), where the policy loss never sees it directly.
Every function returns its value plus, where useful, a dict of detached statistics.
"""
from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F


def masked_mean(x: torch.Tensor, mask: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """Mean of `x` over positions where `mask` is 1 (all of them, or along `dim`)."""
    mask = mask.to(x.dtype)
    if dim is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    return (x * mask).sum(dim) / mask.sum(dim).clamp(min=1)


def token_mean(x: torch.Tensor, mask: torch.Tensor, token_count: float | None = None) -> torch.Tensor:
    """Sum of `x` over the positions where `mask` is 1, divided by `token_count` (> 0); None: by the mask's
    own count (`masked_mean`). A count over a whole global batch makes the losses below token means over
    it, however it is split into micro-batches and ranks (see `engine.rl.batch_mean`); DeepSpeed-Chat
    took each micro-batch's own mean."""
    if token_count is None:
        return masked_mean(x, mask)
    return (x * mask.to(x.dtype)).sum() / token_count


def masked_var(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Unbiased variance over the masked positions."""
    mean = masked_mean(x, mask)
    n = mask.sum().clamp(min=2)
    return ((x - mean) ** 2 * mask).sum() / (n - 1)


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / std over the masked positions; `shift_mean=False` keeps the mean (only rescales)."""
    mean, var = masked_mean(x, mask), masked_var(x, mask)
    out = (x - mean) * torch.rsqrt(var + eps)
    return out if shift_mean else out + mean


def logprobs_from_logits(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """log softmax(logits) at `labels`: (B, L, V), (B, L) -> (B, L), computed in fp32."""
    return torch.gather(F.log_softmax(logits.float(), dim=-1), 2, labels.unsqueeze(-1)).squeeze(-1)


def entropy_from_logits(logits: torch.Tensor) -> torch.Tensor:
    """Per-position entropy of softmax(logits): (B, L, V) -> (B, L)."""
    logp = F.log_softmax(logits.float(), dim=-1)
    return -(logp.exp() * logp).sum(-1)


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str = "k1") -> torch.Tensor:
    """Per-token KL(pi || pi_ref) estimate from sampled tokens (Schulman's k1/k2/k3).

    With r = ref_logprobs - logprobs: k1 = -r (DeepSpeed-Chat's), k2 = r^2 / 2, k3 = e^r - 1 - r (>= 0).
    """
    log_ratio = ref_logprobs - logprobs
    if estimator == "k1":
        return -log_ratio
    if estimator == "k2":
        return 0.5 * log_ratio ** 2
    if estimator == "k3":
        return torch.expm1(log_ratio) - log_ratio
    raise ValueError(f"unknown KL estimator {estimator!r}; use k1, k2 or k3")


def score_position(action_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the action that produced each answer's last real token: the last position with mask 1."""
    positions = torch.arange(action_mask.shape[1], device=action_mask.device)
    return (positions * action_mask.long()).argmax(dim=1)


def kl_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, action_mask: torch.Tensor, kl_coef: float,
               kl_estimator: str = "k1") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The KL-in-reward penalty: -kl_coef * KL on every answer action, 0 elsewhere.

    Args: (B, L) actor and reference log-probs of the taken actions and the action mask; the coefficient and
    the estimator of `kl_penalty`. Returns the per-action rewards (B, L) and {"kl": (B,) the KL estimate summed
    over each answer}, detached. The critic-free estimators take these as their `token_rewards`."""
    kl = kl_penalty(logprobs, ref_logprobs, kl_estimator) * action_mask.to(logprobs.dtype)
    return -kl_coef * kl, {"kl": kl.sum(1).detach()}


def compute_rewards(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, scores: torch.Tensor,
                    action_mask: torch.Tensor, kl_coef: float, clip_reward_value: float,
                    kl_estimator: str = "k1") -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-action rewards: -kl_coef * KL on every answer action, plus the clipped score on the last one.

    Args:
        logprobs, ref_logprobs: (B, L) actor and reference log-probs of the taken actions.
        scores: (B,) reward-model scores of the answers.
        action_mask: (B, L) 1 on answer actions.
        kl_coef: the KL penalty coefficient (DeepSpeed-Chat: 0.1).
        clip_reward_value: scores are clamped to [-v, v] (DeepSpeed-Chat: 5).
    Returns rewards (B, L), zero outside the mask, and per-sequence stats (B,): the KL estimate summed
    over the answer ("kl") and the clipped score ("score_clipped").
    """
    rewards, kl_stats = kl_rewards(logprobs, ref_logprobs, action_mask, kl_coef, kl_estimator)
    clipped = scores.to(rewards.dtype).clamp(-clip_reward_value, clip_reward_value)
    has_answer = action_mask.sum(1) > 0
    rows = torch.arange(rewards.shape[0], device=rewards.device)
    rewards[rows, score_position(action_mask)] += torch.where(has_answer, clipped, torch.zeros_like(clipped))
    return rewards, {"kl": kl_stats["kl"], "score_clipped": clipped.detach()}


def gae(rewards: torch.Tensor, values: torch.Tensor, action_mask: torch.Tensor, gamma: float, lam: float
        ) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation over the answer actions.

    delta_t = r_t + gamma * V_{t+1} - V_t (V beyond the last answer action is 0),
    A_t = delta_t + gamma * lam * A_{t+1};  returns = A + V.
    Args: (B, L) rewards, critic values and action mask. Returns (advantages, returns), both (B, L),
    detached and zero outside the mask.
    """
    mask = action_mask.to(values.dtype)
    values = values.detach() * mask
    rewards = rewards.detach() * mask
    advantages = torch.zeros_like(values)
    next_value = torch.zeros_like(values[:, 0])
    next_adv = torch.zeros_like(values[:, 0])
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        next_adv = (delta + gamma * lam * next_adv) * mask[:, t]
        # Prompt and padding positions carry nothing backwards: left-padding sits before the answer.
        next_value = values[:, t] * mask[:, t] + next_value * (1 - mask[:, t])
        advantages[:, t] = next_adv
    return advantages, (advantages + values) * mask


def policy_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                action_mask: torch.Tensor, cliprange: float, token_count: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate: mean over answer actions of max(-A r, -A clip(r, 1-eps, 1+eps)).

    r = exp(logprobs - old_logprobs). The mean is `token_mean` with `token_count` (None: this batch's
    answer actions). Stats, means the same way: clipfrac (share of actions where the clipped term won),
    approx_kl (mean of (r - 1) - log r, k3 of old vs new); and ratio_max.
    """
    log_ratio = (logprobs - old_logprobs) * action_mask
    ratio = torch.exp(log_ratio)
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - cliprange, 1.0 + cliprange)
    loss = token_mean(torch.maximum(unclipped, clipped), action_mask, token_count)
    with torch.no_grad():
        stats = {"clipfrac": token_mean((clipped > unclipped).float(), action_mask, token_count),
                 "approx_kl": token_mean(torch.expm1(log_ratio) - log_ratio, action_mask, token_count),
                 "ratio_max": (ratio * action_mask).max()}
    return loss, stats


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, action_mask: torch.Tensor,
               cliprange_value: float, token_count: float | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Clipped value loss: 0.5 * mean over answer actions of max((V - R)^2, (V_clip - R)^2),
    V_clip = clamp(V, V_old - eps, V_old + eps); the mean is `token_mean` with `token_count` (None: this
    batch's answer actions). Stats: vf_clipfrac, a mean the same way."""
    clipped_values = torch.maximum(torch.minimum(values, old_values + cliprange_value), old_values - cliprange_value)
    err, err_clipped = (values - returns) ** 2, (clipped_values - returns) ** 2
    loss = 0.5 * token_mean(torch.maximum(err, err_clipped), action_mask, token_count)
    with torch.no_grad():
        stats = {"vf_clipfrac": token_mean((err_clipped > err).float(), action_mask, token_count)}
    return loss, stats


class AdaptiveKLController:
    """Ziegler et al. (2019): nudge the KL coefficient so the measured KL tracks `target`.

    coef <- coef * (1 + clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon). With target None the
    coefficient stays fixed (DeepSpeed-Chat's behaviour).
    """

    def __init__(self, init_coef: float, target: float | None = None, horizon: int = 10000):
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError("target KL and horizon must be > 0")
        self.coef, self.target, self.horizon = init_coef, target, horizon

    def update(self, current_kl: float, n_steps: int) -> float:
        if self.target is not None:
            error = max(-0.2, min(0.2, current_kl / self.target - 1.0))
            self.coef *= 1.0 + error * n_steps / self.horizon
        return self.coef

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef, "target": self.target, "horizon": self.horizon}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef, self.target, self.horizon = state["coef"], state["target"], state["horizon"]


def answer_action_mask(sequences: torch.Tensor, prompt_width: int, pad_id: int, eos_id: int) -> torch.Tensor:
    """The action mask of generated sequences: which actions produced a real answer token.

    Args:
        sequences: (B, T) left-padded prompts of width `prompt_width` followed by generated tokens.
        prompt_width: where answers start (the prompts' padded width).
        pad_id, eos_id: the tokenizer's pad and end tokens (they may be equal).
    Returns (B, T-1) long: position t is 1 when token t+1 is an answer token up to and including the
    first eos. What `generate` writes after an eos (padding) is 0, and so is the prompt.
    """
    answer = sequences[:, prompt_width:]
    is_eos = answer == eos_id
    after_first_eos = (is_eos.long().cumsum(1) - is_eos.long()) > 0
    real = ~after_first_eos & ((answer != pad_id) | is_eos)
    token_mask = torch.zeros_like(sequences)
    token_mask[:, prompt_width:] = real.long()
    return token_mask[:, 1:]


class RunningMoments:
    """Mean and standard deviation of every score seen so far, over all ranks (for --normalize_reward)."""

    def __init__(self) -> None:
        self.count, self.mean, self.m2 = 0.0, 0.0, 0.0

    def update(self, n: float, total: float, total_sq: float) -> None:
        """Merge a batch given as (count, sum, sum of squares) (Chan et al.'s parallel update)."""
        if n == 0:
            return
        batch_mean = total / n
        batch_m2 = max(total_sq - n * batch_mean ** 2, 0.0)
        delta = batch_mean - self.mean
        count = self.count + n
        self.mean += delta * n / count
        self.m2 += batch_m2 + delta ** 2 * self.count * n / count
        self.count = count

    @property
    def std(self) -> float:
        return math.sqrt(self.m2 / self.count) if self.count > 1 else 1.0

    def state_dict(self) -> dict[str, float]:
        return {"count": self.count, "mean": self.mean, "m2": self.m2}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.count, self.mean, self.m2 = state["count"], state["mean"], state["m2"]
