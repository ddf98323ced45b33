"""Language-model evaluation: token-weighted loss and perplexity over an eval set, all ranks together."""
from __future__ import annotations

import math
from typing import Any

import torch

from engine.config import DeepSpeedArgs
from engine.models.lm_head import lm_loss
from engine.runtime.distributed import all_reduce_sum
from engine.runtime.run import to_device


@torch.no_grad()
def evaluate_lm(engine: Any, loader: torch.utils.data.DataLoader, device: torch.device, ds: DeepSpeedArgs
                ) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole eval set, all ranks together, with the loss
    settings of `ds` (--compute_fp32_loss, --logprob_chunk_size)."""
    was_training = engine.module.training
    engine.eval()
    loss_sum, tokens = 0.0, 0.0
    for batch in loader:
        batch = to_device(batch, device)
        _, stats = lm_loss(engine, batch, ds.logprob_chunk_size, fp32=ds.compute_fp32_loss)
        loss_sum += float(stats["loss_sum"])
        tokens += float(stats["tokens"])
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], device)
    if was_training:
        engine.train()
    loss = loss_sum / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
