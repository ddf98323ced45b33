"""Language-model loss: the one owner of the next-token shift. Pure torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = True
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Mean next-token cross-entropy over the labelled positions.

    Args:
        logits: (B, T, V); position t predicts token t + 1.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken (prompt, padding).
        fp32: compute the softmax in fp32 (`--compute_fp32_loss`); else in the logits' dtype.
    Returns:
        the mean loss, and stats {"loss_sum": summed token losses, "tokens": labelled token count},
        both detached, for token-weighted averages across micro-batches and ranks.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    if fp32:
        shift_logits = shift_logits.float()
    token_losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none")
    n_tokens = (shift_labels != IGNORE_INDEX).sum()
    loss_sum = token_losses.sum()
    loss = loss_sum / n_tokens.clamp(min=1)
    return loss, {"loss_sum": loss_sum.detach().float(), "tokens": n_tokens.detach()}
