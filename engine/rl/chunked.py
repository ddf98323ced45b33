"""Log-probs, entropy and the language-model loss from last hidden states, chunk by chunk along the
sequence, so no full (B, L, V) fp32 logits tensor is ever held. Pure torch.

Each chunk applies the LM head (any callable (B, c, H) -> (B, c, V)) and the log-softmax under
`torch.utils.checkpoint`: the forward keeps only the chunk's hidden states, and the backward recomputes one
chunk's logits at a time (see `_run_chunk` for which form and why). The values and gradients equal those
of the full-logits functions in `engine.rl.ppo` and `engine.rl.lm_loss` up to float summation order.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from engine.rl.lm_loss import IGNORE_INDEX, label_count

Head = Callable[[torch.Tensor], torch.Tensor]

# The automatic chunk holds at most this many bytes of fp32 logits. Large enough that each chunk's head
# matmul stays efficient (hundreds of rows), small next to the (B, L, V) tensor it replaces at 32k+ vocab.
AUTO_CHUNK_BYTES = 128 * 2 ** 20


def resolve_chunk_size(chunk_size: int | None, batch: int, vocab: int) -> int:
    """Positions per chunk: `chunk_size` as given (0 = no chunking), or for None the most positions whose
    fp32 logits for `batch` rows fit AUTO_CHUNK_BYTES (at least 1)."""
    if chunk_size is not None:
        return chunk_size
    return max(1, AUTO_CHUNK_BYTES // (4 * batch * vocab))


def _chunk_logprobs(head: Head, hidden: torch.Tensor, labels: torch.Tensor, with_entropy: bool
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    logp = F.log_softmax(head(hidden).float(), dim=-1)
    taken = torch.gather(logp, 2, labels.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp.exp() * logp).sum(-1) if with_entropy else torch.zeros_like(taken)
    return taken, entropy


def _run_chunk(fn: Callable, hidden: torch.Tensor, labels: torch.Tensor):
    # Checkpoint only where a backward will run through the hidden states. The reentrant form re-runs the
    # head as a module call inside the backward, which ZeRO-3's hooks gather for like any forward; the
    # non-reentrant form checks the recomputed tensors against the saved ones and fails on ZeRO-3's
    # released (empty) frozen weights (transformers issue 47254, DeepSpeed PR 8148). With hidden states
    # that need no gradient (only the head trains) the reentrant form would drop the head's gradient, so
    # that rare case keeps each chunk's tensors instead.
    if torch.is_grad_enabled() and hidden.requires_grad:
        return checkpoint(fn, hidden, labels, use_reentrant=True)
    return fn(hidden, labels)


def chunked_logprobs(hidden: torch.Tensor, head: Head, labels: torch.Tensor, chunk_size: int,
                     with_entropy: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log softmax(head(hidden)) at `labels`, and optionally the entropy, chunk by chunk.

    Args:
        hidden: (B, L, H) last hidden states; position t predicts labels[:, t].
        head: the LM head, (B, c, H) -> (B, c, V).
        labels: (B, L) token ids.
        chunk_size: positions per chunk (> 0).
        with_entropy: also return the per-position entropy.
    Returns (logprobs (B, L) in fp32, entropy (B, L) or None), as `logprobs_from_logits` and
    `entropy_from_logits` of `engine.rl.ppo` give them on the full logits.
    """
    taken, entropy = [], []
    for start in range(0, hidden.shape[1], chunk_size):
        stop = start + chunk_size
        lp, ent = _run_chunk(lambda h, y: _chunk_logprobs(head, h, y, with_entropy),
                             hidden[:, start:stop], labels[:, start:stop])
        taken.append(lp)
        entropy.append(ent)
    return torch.cat(taken, 1), (torch.cat(entropy, 1) if with_entropy else None)


def _chunk_token_losses(head: Head, hidden: torch.Tensor, labels: torch.Tensor, fp32: bool) -> torch.Tensor:
    logits = head(hidden)
    if fp32:
        logits = logits.float()
    return F.cross_entropy(logits.reshape(-1, logits.size(-1)), labels.reshape(-1), ignore_index=IGNORE_INDEX,
                           reduction="sum")


def chunked_causal_lm_loss(hidden: torch.Tensor, head: Head, labels: torch.Tensor, chunk_size: int,
                           fp32: bool = True, token_count: float | None = None
                           ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """`engine.rl.lm_loss.causal_lm_loss` from the last hidden states (B, T, H) and the LM head, chunk by
    chunk (`chunk_size` > 0 positions); the same arguments otherwise, the same loss and stats."""
    shift_hidden, shift_labels = hidden[:, :-1], labels[:, 1:]
    loss_sum = None
    for start in range(0, shift_hidden.shape[1], chunk_size):
        stop = start + chunk_size
        part = _run_chunk(lambda h, y: _chunk_token_losses(head, h, y, fp32),
                          shift_hidden[:, start:stop], shift_labels[:, start:stop])
        loss_sum = part if loss_sum is None else loss_sum + part
    if loss_sum is None:  # a one-token batch has no targets
        loss_sum = hidden.sum() * 0.0
    n_tokens = label_count(labels)
    loss = loss_sum / (n_tokens.clamp(min=1) if token_count is None else token_count)
    return loss, {"loss_sum": loss_sum.detach().float(), "tokens": n_tokens.detach()}
