"""Actor losses for critic-free RL as pure tensor functions: KL to the reference as a loss, the clipped
policy loss with its options (asymmetric and dual clipping; GSPO's sequence ratio), and verl's four ways to
aggregate per-action loss terms into the scalar a micro-batch backpropagates.

The loss functions return per-action terms (B, A), zero outside `action_mask`, and `aggregate_loss` turns
them into a scalar; `engine.rl.ppo`'s index conventions hold (positions are actions).
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from engine.rl.ppo import kl_penalty, token_mean

KL_LOSS_ESTIMATORS = ("k1", "k2", "k3", "k3+")
# GSPO's clip range (Zheng et al. 2025; the defaults of TRL's GSPO recipe and verl's GSPO example): its ratio is
# a per-token geometric mean, which moves far less than a token ratio.
GSPO_CLIP_LOW, GSPO_CLIP_HIGH = 3e-4, 4e-4
# verl clamps GSPO's log-ratio at 10 so exp cannot overflow.
GSPO_MAX_LOG_RATIO = 10.0
LOSS_AGG_MODES = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum", "seq-mean-token-sum-norm")


def kl_loss(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, action_mask: torch.Tensor, estimator: str = "k3",
            token_count: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Per-action KL(pi || pi_ref) estimates to add to the actor loss (`--kl_loss_coef` times these).

    k1, k2, k3 as `engine.rl.ppo.kl_penalty`; "k3+" has k3's value and k2's gradient (straight-through,
    verl's `+` suffix): k3 is unbiased and >= 0, while k2's gradient is the one of the true KL's
    (Tang & Munos 2025). Args: (B, A) log-probs of the actor (with grad) and reference, and the action mask.
    Returns the terms (B, A), zero outside the mask, and {"kl": their `token_mean` with `token_count`}."""
    if estimator not in KL_LOSS_ESTIMATORS:
        raise ValueError(f"unknown KL loss estimator {estimator!r}; use one of {', '.join(KL_LOSS_ESTIMATORS)}")
    if estimator == "k3+":
        k2 = kl_penalty(logprobs, ref_logprobs, "k2")
        values = k2 + (kl_penalty(logprobs, ref_logprobs, "k3") - k2).detach()
    else:
        values = kl_penalty(logprobs, ref_logprobs, estimator)
    values = values * action_mask
    return values, {"kl": token_mean(values.detach(), action_mask, token_count)}


def _check_clip(clip_low: float, clip_high: float, dual_clip_c: float | None) -> None:
    if not 0 <= clip_low < 1 or clip_high < 0:
        raise ValueError(f"clip ranges must satisfy 0 <= clip_low < 1 and clip_high >= 0 (got {clip_low}, "
                         f"{clip_high})")
    if dual_clip_c is not None and dual_clip_c <= 1:
        raise ValueError(f"dual_clip_c is the ratio bound for negative advantages and must be > 1 (got {dual_clip_c})")


def _clipped_terms(ratio: torch.Tensor, log_ratio: torch.Tensor, advantages: torch.Tensor,
                   action_mask: torch.Tensor, clip_low: float, clip_high: float, dual_clip_c: float | None,
                   token_count: float | None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """max(-A r, -A clip(r, 1 - clip_low, 1 + clip_high)), and for A < 0 at most -A c (dual clip, Ye et al.
    2020); stats are `token_mean`s: clipfrac_low (A < 0, r under 1 - clip_low), clipfrac_high (A > 0, r over
    1 + clip_high), clipfrac (both), clipfrac_dual, approx_kl (k3 of old vs new), ratio_mean; and ratio_max."""
    unclipped = -advantages * ratio
    clipped = -advantages * ratio.clamp(1.0 - clip_low, 1.0 + clip_high)
    terms = torch.maximum(unclipped, clipped)
    dual = torch.zeros_like(terms, dtype=torch.bool)
    if dual_clip_c is not None:
        bound = -advantages * dual_clip_c
        dual = (advantages < 0) & (terms > bound)
        terms = torch.where(dual, bound, terms)
    terms = terms * action_mask
    with torch.no_grad():
        won = clipped > unclipped
        mean = lambda x: token_mean(x.float(), action_mask, token_count)
        stats = {"clipfrac_low": mean(won & (advantages < 0)), "clipfrac_high": mean(won & (advantages > 0)),
                 "clipfrac": mean(won), "clipfrac_dual": mean(dual),
                 "approx_kl": mean(torch.expm1(log_ratio) - log_ratio), "ratio_mean": mean(ratio),
                 "ratio_max": (ratio * action_mask).max()}
    return terms, stats


def ppo_policy_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                     action_mask: torch.Tensor, *, clip_low: float = 0.2, clip_high: float = 0.2,
                     dual_clip_c: float | None = None, token_count: float | None = None
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """PPO's clipped surrogate per action, r = exp(logprobs - old_logprobs) per token.

    Args: (B, A) actor log-probs (with grad), log-probs at generation time, advantages, action mask;
    clip_low / clip_high: the clip range [1 - low, 1 + high] (DAPO's clip-higher: 0.2 / 0.28; equal: PPO);
    dual_clip_c: None (off) or > 1, the bound on the ratio's weight for negative advantages (verl: 3);
    token_count: the stats' divisor, as in `engine.rl.ppo.token_mean`.
    Returns the terms (B, A), zero outside the mask (aggregate with `aggregate_loss`), and the stats of
    `_clipped_terms`. With equal clips and no dual clip, token-mean of the terms is `engine.rl.ppo.policy_loss`."""
    _check_clip(clip_low, clip_high, dual_clip_c)
    log_ratio = (logprobs - old_logprobs) * action_mask
    return _clipped_terms(torch.exp(log_ratio), log_ratio, advantages, action_mask, clip_low, clip_high,
                          dual_clip_c, token_count)


def gspo_policy_terms(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      action_mask: torch.Tensor, *, clip_low: float = GSPO_CLIP_LOW, clip_high: float = GSPO_CLIP_HIGH,
                      dual_clip_c: float | None = None, token_count: float | None = None
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GSPO (Zheng et al. 2025): one ratio per answer, s_i = exp(mean over its actions of log r_t), the
    geometric mean of the token ratios, clipped like PPO's (arguments as `ppo_policy_terms`).

    GSPO-token form (the paper's eq. 13, verl's): log s_it = sg(log s_i) + logprobs_t - sg(logprobs_t), so every
    action of an answer has the value s_i and the gradient s_i * grad log pi(a_t); aggregated with
    `seq-mean-token-mean` (verl forces it; OpenRLHF too) the gradient is exactly GSPO's sequence-level one.
    The log-ratio is clamped at GSPO_MAX_LOG_RATIO (verl)."""
    _check_clip(clip_low, clip_high, dual_clip_c)
    log_ratio = (logprobs - old_logprobs) * action_mask
    seq_log_ratio = log_ratio.sum(1, keepdim=True) / action_mask.sum(1, keepdim=True).clamp(min=1)
    token_log_ratio = seq_log_ratio.detach() + logprobs - logprobs.detach()
    ratio = torch.exp(token_log_ratio.clamp(max=GSPO_MAX_LOG_RATIO))
    return _clipped_terms(ratio, log_ratio, advantages, action_mask, clip_low, clip_high, dual_clip_c, token_count)


PolicyTermsFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
POLICY_LOSSES: dict[str, PolicyTermsFn] = {"ppo": ppo_policy_terms, "gspo": gspo_policy_terms}


def loss_counts(action_mask: torch.Tensor) -> tuple[int, int]:
    """(answer actions, answers with at least one action) of a micro-batch: what `aggregate_loss` divides by.
    Sum them over an optimizer step's window on all ranks and pass each to `engine.rl.batch_mean.mean_normaliser`
    for the `token_count` and `seq_count` of every micro-batch of the window."""
    return int(action_mask.sum()), int((action_mask.sum(1) > 0).sum())


def aggregate_loss(loss_terms: torch.Tensor, action_mask: torch.Tensor, mode: str = "token-mean", *,
                   token_count: float | None = None, seq_count: float | None = None,
                   constant: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The scalar a micro-batch backpropagates, from per-action terms (B, A) and the action mask (B, A).

    Modes (verl's names; n_i = answer i's actions, the sums over this micro-batch):
    - token-mean: sum_i sum_t l_it / token_count (DAPO's token-level loss; TRL's "dapo").
    - seq-mean-token-mean: sum_i (sum_t l_it / n_i) / seq_count (GRPO's paper; TRL's "grpo"; GSPO's).
    - seq-mean-token-sum: sum_i sum_t l_it / seq_count.
    - seq-mean-token-sum-norm: sum_i sum_t l_it / constant / seq_count (Dr. GRPO; `constant` is its MAX_TOKENS,
      e.g. the maximum answer length, so with seq_count = B it is TRL's "dr_grpo", sum / (B * max length)).
    Split invariance: with `token_count` and `seq_count` from `mean_normaliser` over the window's global counts
    (`loss_counts`), DeepSpeed's mean over micro-batches and ranks of these losses is the same in every mode,
    however the window is split, since an answer is never split. None: this micro-batch's own count, which is
    NOT invariant (a short micro-batch's tokens weigh more). Answers without actions (e.g. masked out as
    truncated) count in neither. Returns the loss and {"tokens", "seqs"}: this micro-batch's counts.
    """
    if mode not in LOSS_AGG_MODES:
        raise ValueError(f"unknown loss aggregation mode {mode!r}; use one of {', '.join(LOSS_AGG_MODES)}")
    mask = action_mask.to(loss_terms.dtype)
    tokens, seqs = mask.sum(), (mask.sum(1) > 0).sum()
    stats = {"tokens": tokens.detach(), "seqs": seqs.detach()}
    if mode == "token-mean":
        return (loss_terms * mask).sum() / (tokens.clamp(min=1) if token_count is None else token_count), stats
    per_seq = (loss_terms * mask).sum(1)
    if mode == "seq-mean-token-mean":
        per_seq = per_seq / mask.sum(1).clamp(min=1)
    elif mode == "seq-mean-token-sum-norm":
        if constant is None or constant <= 0:
            raise ValueError("seq-mean-token-sum-norm needs a constant > 0, e.g. the maximum answer length")
        per_seq = per_seq / constant
    return per_seq.sum() / (seqs.clamp(min=1) if seq_count is None else seq_count), stats
