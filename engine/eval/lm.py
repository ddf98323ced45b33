"""Language-model evaluation: token-weighted loss and perplexity over an eval set, all ranks together."""
from __future__ import annotations

import math
from typing import Any

import torch

from engine.rl.lm_loss import causal_lm_loss
from engine.runtime.distributed import all_reduce_sum
from engine.runtime.run import to_device


@torch.no_grad()
def evaluate_lm(engine: Any, loader: torch.utils.data.DataLoader, device: torch.device, fp32_loss: bool
                ) -> dict[str, float]:
    """Token-weighted eval loss and perplexity over the whole eval set, all ranks together."""
    was_training = engine.module.training
    engine.eval()
    loss_sum, tokens = 0.0, 0.0
    for batch in loader:
        batch = to_device(batch, device)
        logits = engine(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        _, stats = causal_lm_loss(logits, batch["labels"], fp32=fp32_loss)
        loss_sum += float(stats["loss_sum"])
        tokens += float(stats["tokens"])
    loss_sum, tokens = all_reduce_sum([loss_sum, tokens], device)
    if was_training:
        engine.train()
    loss = loss_sum / max(tokens, 1.0)
    return {"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))}
