"""A trained role's DeepSpeed engine: its DeepSpeed config, optimizer, scheduler and initialisation."""
from __future__ import annotations

from typing import Any

import torch

from engine.config import DeepSpeedArgs, TrainArgs
from engine.errors import UserError
from engine.runtime.distributed import gpu_wanted
from engine.runtime.ds_config import fill_template, load_template, size_reduce_bucket, train_ds_config
from engine.runtime.ds_private import coalesce_persistent_gather, full_numel
from engine.runtime.nodes import ds_checkpoint_config


def build_ds_config(ds: DeepSpeedArgs, train: TrainArgs, world_size: int) -> dict[str, Any]:
    """The training DeepSpeed config from the flags, or the user's template filled from them.

    DeepSpeed's own TensorBoard writer stays off: every metric goes through `engine.observe.metrics`."""
    built = train_ds_config(zero_stage=ds.zero_stage, offload=ds.offload, dtype=ds.dtype,
                            micro_batch_size=train.per_device_train_batch_size,
                            gradient_accumulation_steps=train.gradient_accumulation_steps,
                            world_size=world_size, gradient_clipping=ds.gradient_clipping)
    if ds.deepspeed_config:
        return fill_template(load_template(ds.deepspeed_config), built, source=ds.deepspeed_config)
    return built


def make_optimizer(param_groups: list[dict[str, Any]], lr: float, betas: tuple[float, float],
                   offload: bool) -> torch.optim.Optimizer:
    """DeepSpeedCPUAdam with offload, FusedAdam on GPU, torch AdamW on CPU (DeepSpeed-Chat's choice + CPU)."""
    if offload:
        from deepspeed.ops.adam import DeepSpeedCPUAdam

        return DeepSpeedCPUAdam(param_groups, lr=lr, betas=betas, adamw_mode=True)
    if gpu_wanted():
        from deepspeed.ops.adam import FusedAdam

        return FusedAdam(param_groups, lr=lr, betas=betas)
    return torch.optim.AdamW(param_groups, lr=lr, betas=betas)


def make_scheduler(optimizer: torch.optim.Optimizer, name: str, warmup: int, total_steps: int) -> Any:
    from transformers import get_scheduler

    return get_scheduler(name, optimizer=optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def deepspeed_initialize(model: torch.nn.Module, optimizer: Any, scheduler: Any, ds_config: dict[str, Any]) -> Any:
    import deepspeed

    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_checkpoint_config(ds_config), dist_init_required=False)
    coalesce_persistent_gather(engine)  # ZeRO-3: one collective, not one per parameter, after each step
    return engine


def init_trained_engine(model: torch.nn.Module, ds_config: dict[str, Any], *, train: Any, lora: Any, ds: Any,
                        total_steps: int, role: str = "") -> Any:
    """The DeepSpeed engine of a trained model: DeepSpeed-Chat's three parameter groups, the optimizer
    and the learning-rate schedule over `total_steps` optimizer steps.

    `train`, `lora` and `ds` are the config's parts (a step's `cfg.train`, its LoRA part, `cfg.ds`). `role`
    ("actor", "critic") picks step 3's per-role learning rate and weight decay (`--actor_learning_rate`);
    without it `--learning_rate` and `--weight_decay`."""
    from engine.models.lora import optimizer_param_groups

    prefix = f"{role}_" if role else ""
    groups = optimizer_param_groups(model, getattr(train, prefix + "weight_decay"), lora.lora_learning_rate)
    if not groups:
        raise UserError("the model has no trainable parameter; check --only_optimize_lora and the LoRA flags")
    optimizer = make_optimizer(groups, getattr(train, prefix + "learning_rate"), (train.adam_beta1, train.adam_beta2),
                               ds.offload)
    scheduler = make_scheduler(optimizer, train.lr_scheduler_type, train.num_warmup_steps, total_steps)
    trained = sum(full_numel(p) for group in groups for p in group["params"])
    return deepspeed_initialize(model, optimizer, scheduler, size_reduce_bucket(ds_config, trained))
