"""Step 3's four roles (five with the EMA), each a DeepSpeed engine with its own ZeRO stage and offload.

- actor: the step-1 model, trained (optimizer, scheduler, optional LoRA and gradient checkpointing).
- reference: a frozen copy of the step-1 model; ZeRO-3 iff the actor is ZeRO-3, else stage 0.
- critic: the step-2 reward model, trained as the value function.
- reward: the step-2 reward model, frozen; ZeRO-3 iff the critic is ZeRO-3, else stage 0.
- ema (--enable_ema; saved as actor_ema/): a frozen, LoRA-shaped copy of the actor moved towards it after each
  actor update; partitioned like the actor so the two can be gathered in pairs.

Only the roles the run needs are built (`Step3Config.critic_free`, `needs_reference`, `needs_reward_model`): a
critic-free estimator has no critic, no KL term means no reference, reward functions alone mean no reward model;
the missing roles are None.

Frozen roles are in eval mode, have no gradients and belong to no optimizer (DeepSpeed-Chat's layout).

Quantized roles (--reference_quantization, --reward_quantization: bitsandbytes 8-bit or 4-bit) are loaded
whole on every rank and run as plain modules (`FrozenModule`), not DeepSpeed engines: ZeRO cannot
partition bitsandbytes weights. A 4-bit actor (--actor_quantization, QLoRA) is a DeepSpeed engine at
ZeRO 0-2 whose optimizer holds only the LoRA adapters; its EMA is 4-bit too (the EMA moves the adapters).
"""
from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import Any

import torch

from engine.config import Step3Config
from engine.errors import UserError
from engine.models.ema import ema_update
from engine.models.load import check_given_model, is_quantized, load_causal_lm, load_tokenizer, resolve_model_path
from engine.models.lora import apply_lora
from engine.models.paths import hub_error
from engine.models.reward_model import add_lora, load_reward_model, reward_model_folder
from engine.runtime.distributed import DistInfo, gpu_wanted
from engine.runtime.ds_config import (
    eval_ds_config,
    fill_template,
    frozen_zero_stage,
    load_template,
    train_ds_config,
)
from engine.runtime.ds_private import quantize_nontrainable_params
from engine.runtime.engines import deepspeed_initialize, init_trained_engine

logger = logging.getLogger("engine")

ROLE_HINTS = {"actor": "; run step 1 first (step1_sft/main.py) or pass its output folder",
              "critic": "; run step 2 first (step2_reward/main.py) or pass its output folder"}


ROLE_NAMES = ("actor", "critic", "reference", "reward", "ema")  # one vocabulary: here, the planner, the metrics


@dataclass
class Roles:
    actor: Any
    critic: Any | None      # None with a critic-free estimator
    reference: Any | None   # None without a KL term
    reward: Any | None      # None when reward functions score alone
    ema: Any | None
    actor_stage: int
    critic_stage: int
    # A quantized actor's full-precision base, loaded on the CPU
    # (for saving: `engine.runtime.checkpoint.save_hf_folder`).
    actor_full_precision: Callable[[], torch.nn.Module] | None = None

    def trained(self) -> dict[str, Any]:
        """{role name: engine} of the trained roles (what checkpoints and --resume hold)."""
        return {name: engine for name, engine in (("actor", self.actor), ("critic", self.critic)) if engine is not None}

    def by_name(self) -> dict[str, Any]:
        """{role name: engine} for every role built (`ROLE_NAMES` order; no EMA without --enable_ema)."""
        return {name: getattr(self, name) for name in ROLE_NAMES if getattr(self, name) is not None}

    @property
    def ema_stage(self) -> int:
        return frozen_zero_stage(self.actor_stage)


def folder_role(cfg: Step3Config, flag_role: str) -> str:
    """The role errors name for the folder of --<flag_role>_model_name_or_path: a critic-free run reads the
    step-2 folder for its reward model only."""
    return "reward" if flag_role == "critic" and cfg.critic_free else flag_role


def check_role_paths(cfg: Step3Config) -> None:
    """The model-folder checks of `resolve_paths` that need no process group (run before DeepSpeed starts)."""
    for role in ("actor", "critic") if cfg.needs_critic_folder else ("actor",):
        check_given_model(cfg.role_model(role), flag=f"{role}_model_name_or_path", hint=ROLE_HINTS[role],
                          role=folder_role(cfg, role))


def resolve_paths(cfg: Step3Config, dist: DistInfo) -> tuple[str, str | None]:
    """(actor path, critic path or None when no role reads the step-2 folder), checked before anything is
    written: the folders exist, the critic is a reward model and the actor is not, prompt + answer fit the actor,
    and a --deepspeed_config agrees with the flags."""
    roles = ("actor", "critic") if cfg.needs_critic_folder else ("actor",)
    paths: list[str | None] = [resolve_model_path(cfg.role_model(role), cfg.train.seed, dist,
                                                  flag=f"{role}_model_name_or_path", hint=ROLE_HINTS[role],
                                                  role=folder_role(cfg, role))
                               for role in roles]
    if cfg.needs_critic_folder:
        paths[1] = reward_model_folder(paths[1], "critic_model_name_or_path", cfg.model.trust_remote_code,
                                       role=folder_role(cfg, "critic"), dist=dist)
    else:
        paths.append(None)
    check_context_length(paths[0], cfg)
    if cfg.ds.deepspeed_config and not cfg.ds.auto_fit:  # --auto_fit changes the flags; checked when built
        actor_ds_config(cfg, dist.world_size, ptx=bool(cfg.data.unsupervised_dataset_name))
        if not cfg.critic_free:
            critic_ds_config(cfg, dist.world_size)
    return paths[0], paths[1]


def check_context_length(actor_path: str, cfg: Step3Config) -> None:
    """Refuse a reward model as the actor, and prompt + answer lengths beyond the actor's position embeddings
    (where its config says)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(actor_path, trust_remote_code=cfg.model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise hub_error(actor_path, err, "actor") from None
    archs = config.architectures or []
    if any(a.endswith("ForSequenceClassification") for a in archs):
        raise UserError(f"--actor_model_name_or_path {actor_path} is a reward model, not a causal LM (architectures "
                        f"{archs}); pass the folder step 1 wrote")
    limit = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                  if isinstance(getattr(config, k, None), int)), None)
    total = cfg.data.max_prompt_seq_len + cfg.data.max_answer_seq_len
    if limit is not None and total > limit:
        raise UserError(f"--max_prompt_seq_len + --max_answer_seq_len = {total} exceeds the actor's context of "
                        f"{limit} tokens ({actor_path}); lower them")


def load_step3_tokenizer(cfg: Step3Config, actor_path: str, critic_path: str | None) -> Any:
    """The actor's tokenizer; the reward model must use the same vocabulary (it scores the actor's ids)."""
    tok = load_tokenizer(actor_path, cfg.role_model("actor"), cfg.data_args(), role="actor")
    if critic_path is None:
        return tok
    critic_tok = load_tokenizer(critic_path, cfg.role_model("critic"), cfg.data_args(), role=folder_role(cfg, "critic"))
    if tok.get_vocab() != critic_tok.get_vocab():
        raise UserError(f"the tokenizers of --actor_model_name_or_path {actor_path} and --critic_model_name_or_path "
                        f"{critic_path} differ; the reward model must share the actor's vocabulary (train step 2 "
                        "from the same base model as step 1)")
    return tok


def _mixed_precision_lora(cfg: Step3Config) -> bool:
    """MixZ++ applies on a CUDA GPU only; elsewhere the flag is accepted with a warning (compat_notices)."""
    return cfg.ds.enable_mixed_precision_lora and gpu_wanted()


def actor_ds_config(cfg: Step3Config, world_size: int, ptx: bool) -> dict[str, Any]:
    # With PTX the actor takes two backward passes (PPO, then language modelling) per micro-batch,
    # so its accumulation window doubles (as in DeepSpeed-Chat).
    config = _train_config(cfg, cfg.ds.actor_zero_stage, world_size,
                           cfg.train.gradient_accumulation_steps * (2 if ptx else 1))
    if _mixed_precision_lora(cfg):
        config["zero_optimization"]["zero_quantized_nontrainable_weights"] = True
        if torch.cuda.device_count() != world_size:
            config["zero_optimization"]["zero_hpz_partition_size"] = torch.cuda.device_count()
    return config


def critic_ds_config(cfg: Step3Config, world_size: int) -> dict[str, Any]:
    return _train_config(cfg, cfg.ds.critic_zero_stage, world_size, cfg.train.gradient_accumulation_steps)


def _train_config(cfg: Step3Config, stage: int, world_size: int, accumulation: int) -> dict[str, Any]:
    built = train_ds_config(zero_stage=stage, offload=cfg.ds.offload, dtype=cfg.ds.dtype,
                            micro_batch_size=cfg.train.per_device_training_batch_size,
                            gradient_accumulation_steps=accumulation, world_size=world_size,
                            gradient_clipping=cfg.ds.gradient_clipping)
    if cfg.ds.deepspeed_config:
        return fill_template(load_template(cfg.ds.deepspeed_config), built, source=cfg.ds.deepspeed_config)
    return built


def frozen_ds_config(cfg: Step3Config, follows_stage: int, offload: bool, world_size: int) -> dict[str, Any]:
    return eval_ds_config(zero_stage=frozen_zero_stage(follows_stage), offload=offload, dtype=cfg.ds.dtype,
                          micro_batch_size=cfg.train.per_device_training_batch_size, world_size=world_size)


def _freeze(model: torch.nn.Module) -> torch.nn.Module:
    return model.eval().requires_grad_(False)


class FrozenModule(torch.nn.Module):
    """A frozen role run as a plain module, with what step 3 uses of a DeepSpeed engine: `.module`, calls,
    `.eval()` and `optimizer` None. For quantized roles, whose bitsandbytes weights ZeRO cannot partition."""

    optimizer = None

    def __init__(self, module: torch.nn.Module):
        super().__init__()
        self.module = _freeze(module)

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.module(*args, **kwargs)


def init_frozen(model: torch.nn.Module, ds_config: dict[str, Any] | None) -> Any:
    """A frozen role: a DeepSpeed inference engine (`ds_config`), or a `FrozenModule` for a quantized model."""
    if is_quantized(model):
        return FrozenModule(model)
    engine = deepspeed_initialize(_freeze(model), None, None, ds_config)
    engine.eval()
    return engine


def _frozen_config(cfg: Step3Config, quantization: str, follows_stage: int, offload: bool,
                   world_size: int) -> dict[str, Any] | None:
    """The DeepSpeed config of a frozen role; None for a quantized one (a plain module, see `FrozenModule`)."""
    if quantization != "none":
        return None
    return frozen_ds_config(cfg, follows_stage, offload, world_size)


def build_roles(cfg: Step3Config, dist: DistInfo, tokenizer: Any, actor_path: str, critic_path: str | None,
                total_steps: int, ptx: bool) -> Roles:
    """Load and wrap every role the run needs. `total_steps` is the optimizer steps of each trained role's
    schedule."""
    world, ds, dtype, device = dist.world_size, cfg.ds, cfg.ds.dtype, dist.device
    actor_args, critic_args = cfg.role_model("actor"), cfg.role_model("critic")

    # Actor (+ LoRA; a 4-bit base with --actor_quantization) and its frozen reference.
    actor_config = actor_ds_config(cfg, world, ptx)
    actor = load_causal_lm(actor_path, actor_args, tokenizer, dtype, actor_config, ds.actor_gradient_checkpointing,
                           ds.actor_quantization, device, role="actor")
    actor_lora = cfg.role_lora("actor")
    if actor_lora.lora_dim > 0:
        actor = apply_lora(actor, actor_lora)
    actor_engine = init_trained_engine(actor, actor_config, train=cfg.train, lora=actor_lora, ds=cfg.ds,
                                       total_steps=total_steps, role="actor")
    if _mixed_precision_lora(cfg):
        quantize_nontrainable_params(actor_engine)
    ref_config = _frozen_config(cfg, ds.reference_quantization, ds.actor_zero_stage, ds.offload_reference_model, world)
    reference = (init_frozen(load_causal_lm(actor_path, actor_args, tokenizer, dtype, ref_config, False,
                                             ds.reference_quantization, device, role="reference"), ref_config)
                 if cfg.needs_reference else None)

    # Critic (+ LoRA) and the frozen reward model, both from the step-2 folder, when the run has them.
    critic_lora = cfg.role_lora("critic")
    critic_engine = (None if cfg.critic_free else
                     _critic_role(cfg, critic_path, critic_args, tokenizer, total_steps, world))
    reward_config = _frozen_config(cfg, ds.reward_quantization, ds.critic_zero_stage, ds.offload_reward_model, world)
    reward = (init_frozen(load_reward_model(critic_path, critic_args, tokenizer, dtype, reward_config, False,
                                             ds.reward_quantization, device, role="reward"), reward_config)
              if cfg.needs_reward_model else None)

    ema_engine = _ema_role(cfg, actor_engine, actor_path, tokenizer, dist) if cfg.ppo.enable_ema else None
    if ds.actor_quantization not in ("none", ds.reference_quantization):
        logger.warning("--actor_quantization %s with --reference_quantization %s: the KL penalty also measures the "
                       "quantization of the actor's base (it is not 0 before training); --reference_quantization %s "
                       "compares the actor with the same quantized base", ds.actor_quantization,
                       ds.reference_quantization, ds.actor_quantization)
    # What a saved 4-bit actor is made of: the base re-read in --dtype on the CPU, LoRA merged into it.
    full_precision = (partial(load_causal_lm, actor_path, actor_args, tokenizer, dtype, None, False, role="actor")
                      if ds.actor_quantization != "none" else None)
    roles = Roles(actor_engine, critic_engine, reference, reward, ema_engine, ds.actor_zero_stage, ds.critic_zero_stage,
                  full_precision)
    critic_text = (f"ZeRO-{ds.critic_zero_stage}" + (f" LoRA {critic_lora.lora_dim}" if critic_lora.lora_dim else "")
                   if critic_engine is not None else "none")
    logger.info("roles: actor %s%s, critic %s, reference %s, reward %s%s",
                _describe(ds.actor_zero_stage, ds.actor_quantization),
                f" LoRA {actor_lora.lora_dim}" if actor_lora.lora_dim else "", critic_text,
                _describe(ref_config, ds.reference_quantization) if reference is not None else "none",
                _describe(reward_config, ds.reward_quantization) if reward is not None else "none (reward functions)",
                ", EMA" if ema_engine is not None else "")
    return roles


def _critic_role(cfg: Step3Config, critic_path: str, critic_args: Any, tokenizer: Any, total_steps: int,
                 world: int) -> Any:
    """The critic engine (+ LoRA), started from the step-2 reward model."""
    critic_config = critic_ds_config(cfg, world)
    critic = load_reward_model(critic_path, critic_args, tokenizer, cfg.ds.dtype, critic_config,
                               cfg.ds.critic_gradient_checkpointing, role="critic")
    critic_lora = cfg.role_lora("critic")
    if critic_lora.lora_dim > 0:
        critic = add_lora(critic, critic_lora)
    return init_trained_engine(critic, critic_config, train=cfg.train, lora=critic_lora, ds=cfg.ds,
                               total_steps=total_steps, role="critic")


def _ema_role(cfg: Step3Config, actor_engine: Any, actor_path: str, tokenizer: Any, dist: DistInfo) -> Any:
    """The EMA of the actor, starting as its copy. Same structure as the actor (LoRA and 4-bit base included) so
    parameters pair by name; with a 4-bit actor both bases are the same frozen weights and the EMA moves the
    adapters only."""
    ds = cfg.ds
    ema_config = _frozen_config(cfg, ds.actor_quantization, ds.actor_zero_stage, ds.offload_reference_model,
                                dist.world_size)
    ema = load_causal_lm(actor_path, cfg.role_model("actor"), tokenizer, ds.dtype, ema_config, False,
                         ds.actor_quantization, dist.device, role="ema")
    actor_lora = cfg.role_lora("actor")
    if actor_lora.lora_dim > 0:
        with torch.random.fork_rng(devices=[]):  # its LoRA init is overwritten; keep the RNG stream
            ema = apply_lora(ema, actor_lora)
    ema_engine = init_frozen(ema, ema_config)
    ema_update(ema_engine.module, actor_engine.module, decay=0.0, zero_stage=ds.actor_zero_stage)
    return ema_engine


def _describe(stage_or_config: int | dict[str, Any] | None, quantization: str) -> str:
    """'ZeRO-3', or 'ZeRO-0 4bit' for a quantized trained role, or '8bit (whole on each rank)' for a frozen one."""
    if stage_or_config is None:
        return f"{quantization} (whole on each rank)"
    stage = stage_or_config if isinstance(stage_or_config, int) else stage_or_config["zero_optimization"]["stage"]
    return f"ZeRO-{stage}" + (f" {quantization}" if quantization != "none" else "")
