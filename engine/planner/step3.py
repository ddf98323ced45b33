"""The planner for a parsed `Step3Config`: its knobs and workload, the prediction benchmarks compare
against, and step 3's `--auto_fit`."""
from __future__ import annotations

import dataclasses
import os
from typing import Any

import psutil
import torch

from engine.config import Step3Config
from engine.errors import UserError
from engine.flags import check
from engine.models.tiny import ensure_tiny_model
from engine.planner.plan import (
    REQUESTED,
    GiB,
    Hardware,
    Knobs,
    Workload,
    algorithm_of,
    couple_lora,
    predict,
    search,
)
from engine.planner.shapes import load_config, model_shape_of
from engine.runtime.distributed import gpu_wanted

KNOB_PARTS = ("ds", "lora", "train", "ppo")  # the parts of Step3Config that hold the knobs


def knobs_from_step3(cfg: Step3Config) -> Knobs:
    """The knobs of a parsed `Step3Config`."""
    values = {}
    for f in dataclasses.fields(Knobs):
        part = next(getattr(cfg, p) for p in KNOB_PARTS if hasattr(getattr(cfg, p), f.name))
        values[f.name] = getattr(part, f.name)
    return Knobs(**values)


def workload_of_step3(cfg: Step3Config, world_size: int, actor_config: Any = None, critic_config: Any = None
                      ) -> Workload:
    """The workload of a parsed `Step3Config`: its models (the configs default to those in its model
    folders; the critic's folder is not read when the run builds neither critic nor reward model) and its
    algorithm: the estimator, answers per prompt and which of critic, reference and reward model exist."""
    def config_of(path: str | None) -> Any:
        return load_config(path if path is not None else str(ensure_tiny_model(cfg.train.seed)))

    actor_config = actor_config or config_of(cfg.model.actor_model_name_or_path)
    if critic_config is None and cfg.critic_free and not cfg.needs_reward_model:
        critic_config = actor_config  # a stand-in: no role has the critic's shape
    actor = model_shape_of(actor_config)
    critic = model_shape_of(critic_config or config_of(cfg.model.critic_model_name_or_path),
                            sequence_classification=True)
    return Workload(actor, critic, cfg.data.max_prompt_seq_len, cfg.data.max_answer_seq_len, world_size,
                    cfg.step_generation_batches, **algorithm_of(cfg))


def predict_for_step3(cfg: Step3Config, world_size: int, merge_host: bool | None = None) -> dict[str, Any]:
    """The planner's prediction for a parsed `Step3Config` on `world_size` ranks, per rank:
    {"peak_gb": {"generate", "experience", "train", "actor_train", "critic_train" (with a critic)}, "roles":
    {role: {part: GiB}} (the roles the run builds), "host_gb"}. `merge_host` (default: when no GPU is used)
    adds host bytes to the peaks, as a CPU-only run holds everything in one memory."""
    if merge_host is None:
        merge_host = not gpu_wanted()
    pred = predict(workload_of_step3(cfg, world_size), knobs_from_step3(cfg))
    peaks = pred.peak_gb(merge_host)
    peaks["train"] = max(peaks["actor_train"], peaks.get("critic_train", 0.0))
    roles = {r: {part: (v.gpu + v.cpu if merge_host else v.gpu) / GiB for part, v in parts.items()}
             for r, parts in pred.roles.items()}
    return {"peak_gb": peaks, "roles": roles, "host_gb": pred.host_gb()}


def this_machine(world_size: int) -> Hardware:
    """The GPUs (or, on a CPU run, each rank's share of host memory) and host memory of this machine."""
    host = psutil.virtual_memory().total / GiB
    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
    if gpu_wanted() and torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory / GiB
    else:
        gpu = host / per_node
    return Hardware(world_size, gpu, host, gpus_per_node=per_node)


def auto_fit(cfg: Step3Config, hw: Hardware, actor_config: Any, critic_config: Any, lora_rank: int = 64
             ) -> tuple[Step3Config, str]:
    """(`cfg` with the cheapest fitting memory settings, a line saying what was chosen) for step 3's
    --auto_fit. The knobs whose flags the user gave (`cfg.given`) are kept; batch sizes are upper bounds.
    Only the roles the run builds count (`workload_of_step3`); critic_config may be None without critic
    and reward model."""
    current = knobs_from_step3(cfg)
    fixed = {f.name: getattr(current, f.name) for f in dataclasses.fields(Knobs)
             if f.name not in REQUESTED and f.name in cfg.given}
    fixed = couple_lora(fixed, lora_rank)
    work = workload_of_step3(cfg, hw.num_gpus, actor_config, critic_config)
    best, closest = search(work, hw, current, fixed, lora_rank)
    if best is None:
        short = max(closest.prediction.peak_gb().values()) - hw.usable_gb
        raise UserError(f"--auto_fit: nothing fits {hw.num_gpus} x {hw.gpu_memory_gb:.0f} GiB; the closest settings "
                        f"({closest.knobs.flags()}) need {short:.1f} GiB more per GPU. Add GPUs, shorten "
                        "--max_prompt_seq_len / --max_answer_seq_len, or unset the memory flags you fixed "
                        "(python -m engine.planner shows the breakdown)")
    parts = {}
    for part_name in KNOB_PARTS:
        part = getattr(cfg, part_name)
        names = {f.name for f in dataclasses.fields(part)}
        parts[part_name] = dataclasses.replace(part, **{f.name: getattr(best.knobs, f.name)
                                                        for f in dataclasses.fields(Knobs) if f.name in names})
    fitted = dataclasses.replace(cfg, **parts)
    fitted.given = cfg.given
    check(fitted)
    peaks = ", ".join(f"{k} {v:.1f}" for k, v in best.prediction.peak_gb().items())
    return fitted, (f"--auto_fit chose {best.knobs.flags()} (predicted peak GiB per GPU: {peaks}; "
                    f"{hw.usable_gb:.1f} usable)")
