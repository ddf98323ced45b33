"""Reward-model math as pure tensor functions: where a sequence's score is read, and the pairwise losses.

Index convention (one owner: `last_real_index`): a sequence's score is the value at its last real
token, the last position whose attention mask is 1. That works for right- and left-padded rows and
matches Hugging Face's `*ForSequenceClassification` pooling (last token that is not the pad id) when
the mask is `input_ids != pad_token_id`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def last_real_index(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) index of the last position with mask 1 in each row of a (B, T) mask (0 for an empty row)."""
    positions = torch.arange(attention_mask.shape[1], device=attention_mask.device)
    return (positions * attention_mask.long()).argmax(dim=1)


def end_scores(values: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """(B,) the per-token values (B, T) read at each row's last real token."""
    idx = last_real_index(attention_mask)
    return values.gather(1, idx.unsqueeze(1)).squeeze(1)


def pad_mask_with_leading(input_ids: torch.Tensor, pad_id: int, num_padding_at_beginning: int) -> torch.Tensor:
    """Attention mask of right-padded rows whose first `num_padding_at_beginning` tokens may equal the
    pad id and still be real (DeepSpeed-Chat's `--num_padding_at_beginning`: OPT's BOS when pad = bos).

    (B, T) ids -> (B, T) long mask; a position is real if it is among the leading ones or is not pad.
    """
    mask = (input_ids != pad_id).long()
    if num_padding_at_beginning > 0:
        mask[:, :num_padding_at_beginning] = 1
    return mask


def pairwise_loss(chosen: torch.Tensor, rejected: torch.Tensor, margin: float = 0.0, l2_coef: float = 0.0,
                  pair_count: float | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Bradley-Terry loss on end scores: mean(-log sigmoid(chosen - rejected - margin)).

    Args:
        chosen, rejected: (B,) end scores of each pair.
        margin: required score gap (0 = plain Bradley-Terry).
        l2_coef: adds l2_coef * mean((chosen + rejected)^2), which keeps scores centred on 0 without
            changing their differences.
        pair_count: the "mean" divides the sum over the pairs by this (> 0); None: by B. For the mean over
            a global batch, see `engine.rl.batch_mean`.
    Returns the loss and detached stats: accuracy (chosen > rejected), mean scores and margin.
    """
    per_pair = -F.logsigmoid(chosen - rejected - margin)
    if l2_coef:
        per_pair = per_pair + l2_coef * (chosen + rejected) ** 2
    return _pair_mean(per_pair, pair_count), _pair_stats(chosen, rejected)


def _pair_mean(per_pair: torch.Tensor, pair_count: float | None) -> torch.Tensor:
    return per_pair.mean() if pair_count is None else per_pair.sum() / pair_count


def span_pairwise_loss(chosen_values: torch.Tensor, rejected_values: torch.Tensor, chosen_ids: torch.Tensor,
                       rejected_ids: torch.Tensor, chosen_mask: torch.Tensor, rejected_mask: torch.Tensor,
                       margin: float = 0.0, l2_coef: float = 0.0, pair_count: float | None = None
                       ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DeepSpeed-Chat's loss: -log sigmoid(v_chosen - v_rejected) averaged over the tokens from the
    first position where the two sequences differ to the end of the longer one, then over pairs (every
    pair weighs the same, however long its span; the pair mean divides by `pair_count` as in `pairwise_loss`).

    Args: (B, T) per-token values, ids and masks of right-padded chosen and rejected rows (same T).
    Pairs with identical sequences have an empty span and contribute 0 (the data pipeline drops them).
    """
    T = chosen_ids.shape[1]
    positions = torch.arange(T, device=chosen_ids.device)
    c_len, r_len = chosen_mask.sum(1), rejected_mask.sum(1)
    end = torch.maximum(c_len, r_len)
    differs = (chosen_ids != rejected_ids) | (positions.unsqueeze(0) >= torch.minimum(c_len, r_len).unsqueeze(1))
    div = torch.where(differs.any(1), differs.float().argmax(1), end)
    span = ((positions >= div.unsqueeze(1)) & (positions < end.unsqueeze(1))).float()
    token_loss = -F.logsigmoid(chosen_values - rejected_values - margin) * span
    per_pair = token_loss.sum(1) / span.sum(1).clamp(min=1)
    chosen, rejected = end_scores(chosen_values, chosen_mask), end_scores(rejected_values, rejected_mask)
    if l2_coef:
        per_pair = per_pair + l2_coef * (chosen + rejected) ** 2
    return _pair_mean(per_pair, pair_count), _pair_stats(chosen, rejected)


def _pair_stats(chosen: torch.Tensor, rejected: torch.Tensor) -> dict[str, torch.Tensor]:
    c, r = chosen.detach().float(), rejected.detach().float()
    return {"accuracy": (c > r).float().mean(), "chosen_score": c.mean(), "rejected_score": r.mean(),
            "score_margin": (c - r).mean()}


def reward_loss(values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, kind: str,
                margin: float = 0.0, l2_coef: float = 0.0, pair_count: float | None = None
                ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The step-2 loss of a (2B, T) batch whose first B rows are chosen and last B rejected.

    kind: 'end' (`pairwise_loss` on end scores) or 'span' (`span_pairwise_loss`); `pair_count` as there.
    """
    b = values.shape[0] // 2
    if kind == "end":
        scores = end_scores(values, attention_mask)
        return pairwise_loss(scores[:b], scores[b:], margin, l2_coef, pair_count)
    if kind == "span":
        return span_pairwise_loss(values[:b], values[b:], input_ids[:b], input_ids[b:], attention_mask[:b],
                                  attention_mask[b:], margin, l2_coef, pair_count)
    raise ValueError(f"unknown reward loss {kind!r}; use 'end' or 'span'")
