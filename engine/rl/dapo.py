"""DAPO's pure pieces (Yu et al. 2025): overlong reward shaping, which answers were truncated (to mask out of the
loss), and dynamic sampling's predicate (which groups to drop). Index conventions of `engine.rl.ppo`: an
answer's length is its number of answer actions, `action_mask.sum(1)`, its eos included."""
from __future__ import annotations

import torch

from engine.rl.advantages import flat_groups
from engine.rl.ppo import score_position


def overlong_penalty(action_mask: torch.Tensor, *, max_answer_len: int, buffer_len: int, penalty_factor: float
                     ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """DAPO's soft overlong punishment, to add to the rewards: 0 up to `max_answer_len - buffer_len` answer
    tokens, then falling linearly to -penalty_factor at `max_answer_len` (verl's and OpenRLHF's
    min(-(L - (max - buffer)) / buffer * factor, 0), held at -factor beyond max).

    Args: action_mask (B, A); max_answer_len: the generation limit; buffer_len: 1..max_answer_len;
    penalty_factor >= 0. Returns the penalty (B,) <= 0 and {"frac_overlong": the share penalised}."""
    if not 0 < buffer_len <= max_answer_len or penalty_factor < 0:
        raise ValueError(f"overlong shaping needs 0 < buffer_len <= max_answer_len and penalty_factor >= 0 "
                         f"(got buffer_len {buffer_len}, max_answer_len {max_answer_len}, factor {penalty_factor})")
    lengths = action_mask.sum(1).float()
    over = ((lengths - (max_answer_len - buffer_len)) / buffer_len).clamp(0.0, 1.0)
    penalty = -penalty_factor * over
    return penalty, {"frac_overlong": (over > 0).float().mean()}


def truncated_answers(sequences: torch.Tensor, action_mask: torch.Tensor, eos_id: int
                      ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(B,) bool: the answers that did not end with eos within the length limit (or have no token at all).

    Args: sequences (B, T); action_mask (B, T-1) from `engine.rl.ppo.answer_action_mask` (which covers an
    answer up to its first eos, so an answer ended properly iff its last answer token is eos, also when
    pad = eos); eos_id. Mask them out of the loss with `action_mask * ~truncated.unsqueeze(1)`.
    Returns them and {"frac_truncated"}."""
    rows = torch.arange(sequences.shape[0], device=sequences.device)
    last_token = sequences[:, 1:][rows, score_position(action_mask)]  # action t produced token t + 1
    truncated = (action_mask.sum(1) == 0) | (last_token != eos_id)
    return truncated, {"frac_truncated": truncated.float().mean()}


def informative_groups(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dynamic sampling's filter: which rows to keep, (B,) bool, dropping each group whose scored rewards are all
    equal (or that has fewer than two scored; `engine.rl.advantages.flat_groups`), whose advantages would all be 0.

    Args: rewards (B,) (NaN = no score), rows ordered by group; group_size >= 2.
    Returns the rows to keep and {"groups_kept", "groups_dropped"} (counts)."""
    flat = flat_groups(rewards, group_size)
    keep = (~flat).repeat_interleave(group_size)
    return keep, {"groups_kept": (~flat).sum(), "groups_dropped": flat.sum()}
