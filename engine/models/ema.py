"""Exponential moving average of the actor's weights (DeepSpeed-Chat's `--enable_ema`).

ema <- decay * ema + (1 - decay) * actor, after each actor update. Under ZeRO-3 each pair of
parameters is gathered in turn and rank 0's result is partitioned back to every rank.
"""
from __future__ import annotations

import contextlib

import torch


@torch.no_grad()
def ema_update(ema_model: torch.nn.Module, model: torch.nn.Module, decay: float, zero_stage: int = 0) -> None:
    """Move every EMA parameter towards the model's: lerp(param, ema, decay) = decay*ema + (1-decay)*param.

    The two models must have the same parameter names (the EMA is a copy of the actor, LoRA included).
    Quantized (integer-stored) weights are skipped: they are the same frozen base in both models.
    """
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"EMA decay must be in [0, 1], not {decay}")
    params = dict(model.named_parameters())
    for name, ema_param in ema_model.named_parameters():
        if not ema_param.dtype.is_floating_point:
            # A bitsandbytes-quantized base (4-bit actor): frozen, and the same weights in both models.
            continue
        param = params[name]
        if zero_stage == 3:
            import deepspeed

            gather = deepspeed.zero.GatheredParameters([param, ema_param], modifier_rank=0)
        else:
            gather = contextlib.nullcontext()
        with gather:
            ema_param.data.copy_(torch.lerp(param.data.to(ema_param.dtype), ema_param.data, decay))
