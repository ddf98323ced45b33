"""DPO-family math as pure tensor functions: which actions a pair's log-probability sums over, and the losses.

Index convention (one owner: `answer_actions`): a pair row is `[prompt..., a0, a1, <end>, <pad>...]`,
right-padded, with `prompt_lengths` the number of prompt tokens. Token log-probs are indexed by action, as in
step 3: `logprobs[:, t] = log pi(seq[t+1] | seq[:t+1])`, shape (B, T-1). The answer's actions are those that
produce a real token at or after the prompt's end: the prompt is masked out, the end token is counted (it is a
real token, attention mask 1, even when the end token's id is the pad id). DeepSpeed-Chat finds the prompt as
the first position where chosen and rejected differ and masks every pad id, so with pad == eos it drops the end
token (`../shared/reference/algorithms.md` section 2); here the prompt length is the prompt tokenized alone.

The losses take per-sequence log-probabilities (`sequence_logps`): sums for sigmoid, hinge and robust (as
DeepSpeed-Chat, OpenRLHF and TRL), means over the answer's tokens for ipo and simpo (`LENGTH_NORMALISED`).
Each returns (loss, detached stats). The loss is the sum over pairs divided by `pair_count` (None: the mean
over this batch's pairs; `engine.rl.batch_mean` for the mean over a global batch).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

LOSSES = ("sigmoid", "ipo", "hinge", "robust", "simpo")
LENGTH_NORMALISED = ("ipo", "simpo")  # these compare mean log-probs per answer token
REFERENCE_FREE = ("simpo",)


def answer_actions(prompt_lengths: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T-1) float mask of the actions that produce answer tokens.

    prompt_lengths: (B,) prompt tokens per row; attention_mask: (B, T), 1 on real tokens (right padding).
    Action t produces token t+1, so it is an answer action when t+1 >= prompt length and token t+1 is real.
    """
    positions = torch.arange(1, attention_mask.shape[1], device=attention_mask.device)
    after_prompt = positions.unsqueeze(0) >= prompt_lengths.to(attention_mask.device).unsqueeze(1)
    return (after_prompt & (attention_mask[:, 1:] > 0)).float()


def sequence_logps(logprobs: torch.Tensor, action_mask: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sums, means, counts), each (B,): the answer's log-probability, its mean per answer token, the tokens.

    logprobs: (B, T-1) log-probs of the taken tokens; action_mask: (B, T-1) from `answer_actions`. An empty
    answer has sum 0, count 0 and mean 0.
    """
    mask = action_mask.to(logprobs.dtype)
    sums = (logprobs * mask).sum(-1)
    counts = mask.sum(-1)
    return sums, sums / counts.clamp(min=1), counts


def _smoothed_logistic(z: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    # Conservative DPO (cDPO): the preference label is flipped with probability `label_smoothing`.
    return -(1 - label_smoothing) * F.logsigmoid(z) - label_smoothing * F.logsigmoid(-z)


def dpo_loss(policy_chosen: torch.Tensor, policy_rejected: torch.Tensor, ref_chosen: torch.Tensor | None,
             ref_rejected: torch.Tensor | None, *, loss_type: str = "sigmoid", beta: float = 0.1,
             label_smoothing: float = 0.0, simpo_gamma: float = 0.5, pair_count: float | None = None
             ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss of B pairs.

    Args:
        policy_chosen, policy_rejected: (B,) the policy's answer log-probs (sums, or means for
            `LENGTH_NORMALISED` losses).
        ref_chosen, ref_rejected: (B,) the reference's, alike; ignored (may be None) for simpo.
        loss_type: with h = (policy_chosen - ref_chosen) - (policy_rejected - ref_rejected),
            sigmoid: -(1-ls) logsig(beta h) - ls logsig(-beta h) (DPO, eq. 7; cDPO with ls > 0);
            ipo: (h - 1/(2 beta))^2 (IPO, eq. 17); hinge: relu(1 - beta h) (SLiC);
            robust: ((1-ls)(-logsig(beta h)) + ls logsig(-beta h)) / (1 - 2 ls) (rDPO, unbiased under noise);
            simpo: reference-free, -(1-ls) logsig(z) - ls logsig(-z) with z = beta (pc - pr) - simpo_gamma.
        beta: the KL strength (DPO's beta; SimPO's reward scale).
        label_smoothing: the chance a preference label is wrong (sigmoid, robust, simpo).
        simpo_gamma: SimPO's target reward margin.
        pair_count: the loss is the sum over pairs / this; None: the mean.
    Returns the loss and detached stats: rewards (B,) of chosen and rejected (beta x log-ratio to the
    reference; SimPO: beta x mean log-prob), accuracy and margin.
    """
    if loss_type in REFERENCE_FREE:
        chosen_rewards, rejected_rewards = beta * policy_chosen, beta * policy_rejected
        per_pair = _smoothed_logistic(chosen_rewards - rejected_rewards - simpo_gamma, label_smoothing)
        return _pair_mean(per_pair, pair_count), _reward_stats(chosen_rewards, rejected_rewards)
    if ref_chosen is None or ref_rejected is None:
        raise ValueError(f"the {loss_type!r} loss needs the reference's log-probs")
    chosen_ratio, rejected_ratio = policy_chosen - ref_chosen, policy_rejected - ref_rejected
    h = chosen_ratio - rejected_ratio
    if loss_type == "sigmoid":
        per_pair = _smoothed_logistic(beta * h, label_smoothing)
    elif loss_type == "ipo":
        per_pair = (h - 1 / (2 * beta)) ** 2
    elif loss_type == "hinge":
        per_pair = torch.relu(1 - beta * h)
    elif loss_type == "robust":
        per_pair = ((1 - label_smoothing) * -F.logsigmoid(beta * h)
                    + label_smoothing * F.logsigmoid(-beta * h)) / (1 - 2 * label_smoothing)
    else:
        raise ValueError(f"unknown DPO loss {loss_type!r}; use one of {', '.join(LOSSES)}")
    return _pair_mean(per_pair, pair_count), _reward_stats(beta * chosen_ratio, beta * rejected_ratio)


def nll_term(chosen_means: torch.Tensor, nll_coef: float, pair_count: float | None = None) -> torch.Tensor:
    """nll_coef x the chosen answers' negative log-likelihood per token, averaged over pairs like the loss
    (each pair weighs the same, as the DPO term; Llama 3's NLL term on the chosen answer).

    chosen_means: (B,) mean log-prob per answer token of each chosen answer."""
    return nll_coef * _pair_mean(-chosen_means, pair_count)


def _pair_mean(per_pair: torch.Tensor, pair_count: float | None) -> torch.Tensor:
    return per_pair.mean() if pair_count is None else per_pair.sum() / pair_count


def _reward_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    c, r = chosen.detach().float(), rejected.detach().float()
    return {"chosen_rewards": c, "rejected_rewards": r, "accuracies": (c > r).float(), "margins": c - r}
