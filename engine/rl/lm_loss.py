"""Language-model loss: the one owner of the next-token shift. Pure torch."""
from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def label_count(labels: torch.Tensor) -> torch.Tensor:
    """The number of targets `causal_lm_loss` takes the loss over: labelled positions after the first."""
    return (labels[:, 1:] != IGNORE_INDEX).sum()


def causal_lm_loss(logits: torch.Tensor, labels: torch.Tensor, fp32: bool = True, token_count: float | None = None
                   ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Next-token cross-entropy summed over the labelled positions, divided by `token_count`.

    Args:
        logits: (B, T, V); position t predicts token t + 1.
        labels: (B, T) token ids, IGNORE_INDEX where no loss is taken (prompt, padding).
        fp32: compute the softmax in fp32 (`--compute_fp32_loss`); else in the logits' dtype.
        token_count: the divisor (> 0); None: this batch's labelled token count (the batch mean). For the
            token mean over a global batch, see `engine.rl.batch_mean`.
    Returns:
        the loss, and stats {"loss_sum": summed token losses, "tokens": labelled token count},
        both detached, for token-weighted averages across micro-batches and ranks.
    """
    shift_logits = logits[:, :-1, :]
    shift_labels = labels[:, 1:]
    if fp32:
        shift_logits = shift_logits.float()
    token_losses = F.cross_entropy(shift_logits.reshape(-1, shift_logits.size(-1)), shift_labels.reshape(-1),
                                   ignore_index=IGNORE_INDEX, reduction="none")
    n_tokens = label_count(labels)
    loss_sum = token_losses.sum()
    loss = loss_sum / (n_tokens.clamp(min=1) if token_count is None else token_count)
    return loss, {"loss_sum": loss_sum.detach().float(), "tokens": n_tokens.detach()}
