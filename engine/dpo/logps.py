"""The answer log-probs of a DPO pair batch: one forward over chosen and rejected together."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from engine.models.lm_head import token_logprobs
from engine.models.load import position_ids
from engine.rl.dpo import answer_actions, sequence_logps


@dataclass
class PairLogps:
    """Per-pair answer log-probs of a batch of B pairs, each (B,)."""

    chosen: torch.Tensor            # (B,) summed over the chosen answer's tokens (the end token included)
    rejected: torch.Tensor          # (B,) summed over the rejected answer's tokens
    chosen_counts: torch.Tensor     # (B,) answer tokens of each chosen answer
    rejected_counts: torch.Tensor   # (B,)

    @property
    def chosen_means(self) -> torch.Tensor:
        return self.chosen / self.chosen_counts.clamp(min=1)

    @property
    def rejected_means(self) -> torch.Tensor:
        return self.rejected / self.rejected_counts.clamp(min=1)

    def detached(self) -> PairLogps:
        return PairLogps(*(t.detach() for t in (self.chosen, self.rejected, self.chosen_counts, self.rejected_counts)))


def pair_logps(model: Any, batch: dict[str, torch.Tensor], chunk_size: int | None) -> PairLogps:
    """`model`'s answer log-probs of a (2B, T) pair batch (rows 0..B-1 chosen, B..2B-1 rejected; `prompt_lengths`
    (2B,) as `engine.data.pairs.collate_dpo_pairs` gives), in fp32, in one forward."""
    ids, mask = batch["input_ids"], batch["attention_mask"]
    logprobs, _ = token_logprobs(model, ids, mask, position_ids(mask), chunk_size)
    sums, _, counts = sequence_logps(logprobs.float(), answer_actions(batch["prompt_lengths"], mask))
    b = ids.shape[0] // 2
    return PairLogps(sums[:b], sums[b:], counts[:b], counts[b:])


def answer_counts(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(chosen, rejected) answer token counts (B,) of a pair batch, from its masks alone."""
    counts = answer_actions(batch["prompt_lengths"], batch["attention_mask"]).sum(-1)
    b = counts.shape[0] // 2
    return counts[:b], counts[b:]
