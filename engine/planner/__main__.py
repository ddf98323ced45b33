"""Will this step-3 run fit, and with which flags? (The DPO step: --step dpo, engine/planner/dpo_cli.py.)

    python -m engine.planner --actor_model llama-2-7b --critic_model llama-2-7b --num_gpus 1 \\
        --gpu_memory_gb 24 --max_prompt_seq_len 256 --max_answer_seq_len 256

Add --json for one JSON object. Models: a shipped config name (see --list_models) or a Hugging Face
folder. Step-3 flags given here (--actor_zero_stage 3, --offload, --actor_lora_dim 8,
--reference_quantization 4bit, ...) are kept as given; the planner searches the others for the cheapest
settings that fit: fewest offloads, fewest quantized roles, full fine-tuning before LoRA, the requested
batch sizes (halved until they fit), no gradient checkpointing, the lowest ZeRO stages, the hybrid mode
on. Exit status 0 when something fits, 1 when nothing does (the message says how much is missing).

The algorithm flags are step 3's: --advantage_estimator grpo (or any but gae) plans without a critic,
--n_samples_per_prompt N with N answers per prompt, --kl_ctl 0 --kl_loss_coef 0 without a reference,
--reward_funcs (without --critic_model) without a reward model. Default: PPO, as step 3's.
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from engine.config import Step3Config
from engine.errors import UserError
from engine.flags import build_config, leaf_fields
from engine.helptext import HelpFormatter
from engine.planner.cli import add_hardware_args, hardware_of, parse_bool, phase_table
from engine.planner.plan import Hardware, Knobs, Workload, algorithm_of, couple_lora, search
from engine.planner.shapes import load_config, model_shape_of, shipped_models
from engine.runtime.entry import run_main

# Knob flags: absent means "the planner chooses".
BOOL_KNOBS = ("offload", "offload_reference_model", "offload_reward_model", "actor_gradient_checkpointing",
              "critic_gradient_checkpointing", "only_optimize_lora", "enable_hybrid_engine")
FIXED = ("actor_zero_stage", "critic_zero_stage", "actor_lora_dim", "critic_lora_dim", "reference_quantization",
         "reward_quantization", "actor_quantization") + BOOL_KNOBS
# The step-3 flags of the algorithm: which roles exist and how many rollout rows a prompt gives.
ALGORITHM = ("advantage_estimator", "n_samples_per_prompt", "kl_ctl", "kl_loss_coef", "reward_funcs")
STEPS = ("3", "dpo")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.planner", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--step", choices=STEPS, default="3",
                   help="the step to plan: 3 (RLHF: PPO or critic-free; the flags below) or dpo (its own flags: "
                        "python -m engine.planner --step dpo -h)")
    p.add_argument("--actor_model", help="shipped config name or model folder of the actor")
    p.add_argument("--critic_model", help="of the critic and reward model (default: the actor's)")
    p.add_argument("--list_models", action="store_true", help="print the shipped model configs and exit")
    add_hardware_args(p)
    p.add_argument("--max_prompt_seq_len", type=int, default=256)
    p.add_argument("--max_answer_seq_len", type=int, default=256)
    p.add_argument("--per_device_generation_batch_size", type=int, default=16, help="the most to try")
    p.add_argument("--per_device_training_batch_size", type=int, default=16, help="the most to try")
    p.add_argument("--generation_batches", type=int, default=1)
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"))
    p.add_argument("--enable_ema", action="store_true")
    p.add_argument("--lora_rank", type=int, default=64, help="LoRA rank the search uses when it turns LoRA on")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    algorithm = p.add_argument_group("step-3 algorithm flags (default: PPO, as step 3's)")
    for name in ALGORITHM:
        _, f, tp = leaf_fields(Step3Config)[name]
        text = f.metadata["help"].replace("%", "%%")
        if name == "reward_funcs":
            algorithm.add_argument(f"--{name}", nargs="*", default=[], metavar="REF", help=text)
        else:
            algorithm.add_argument(f"--{name}", type=tp, default=f.default, choices=f.metadata["choices"], help=text)
    fixed = p.add_argument_group("step-3 flags to keep (the planner chooses those not given)")
    for name in FIXED:  # type, choices and help from the step-3 config field
        _, f, tp = leaf_fields(Step3Config)[name]
        text = f.metadata["help"].replace("%", "%%")
        if name in BOOL_KNOBS:
            fixed.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, metavar="true|false", help=text)
        else:
            fixed.add_argument(f"--{name}", type=tp, choices=f.metadata["choices"], help=text)
    return p


def fixed_knobs(args: argparse.Namespace) -> dict[str, Any]:
    """Flag name -> value of the knobs given on the command line (see `couple_lora` for LoRA)."""
    return couple_lora({name: getattr(args, name) for name in FIXED if getattr(args, name) is not None},
                       args.lora_rank)


def algorithm_config(args: argparse.Namespace) -> Step3Config:
    """A step-3 config with the algorithm flags given here (and --critic_model as the critic's folder), whose
    predicates say which roles the run builds."""
    values: dict[str, Any] = {name: getattr(args, name) for name in ALGORITHM}
    if args.critic_model:
        values["critic_model_name_or_path"] = args.critic_model
    cfg = build_config(Step3Config, values)
    cfg.given = frozenset(n for n in values if n != "reward_funcs" or values[n])
    bad = cfg.rl.problems() + cfg.ppo.problems()
    if bad:
        raise UserError("the given step-3 algorithm flags are not valid: " + "; ".join(bad))
    return cfg


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The planner's answer as a JSON-able dict (see `main` for its keys)."""
    if not args.actor_model:
        raise UserError("give --actor_model (a shipped config name or a model folder); --list_models lists the names")
    hw = hardware_of(args)
    for name in ("per_device_generation_batch_size", "per_device_training_batch_size",
                 "max_prompt_seq_len", "max_answer_seq_len", "generation_batches"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name} must be at least 1, not {getattr(args, name)}")
    actor = model_shape_of(load_config(args.actor_model))
    critic = model_shape_of(load_config(args.critic_model or args.actor_model), sequence_classification=True)
    work = Workload(actor, critic, args.max_prompt_seq_len, args.max_answer_seq_len, args.num_gpus,
                    args.generation_batches, **algorithm_of(algorithm_config(args)))
    requested = Knobs(per_device_generation_batch_size=args.per_device_generation_batch_size,
                      per_device_training_batch_size=args.per_device_training_batch_size, dtype=args.dtype,
                      enable_ema=args.enable_ema)
    fixed = fixed_knobs(args)
    bad = Knobs(**fixed).problems()
    if bad:
        raise UserError("the given step-3 flags do not go together: " + "; ".join(bad))
    try:
        best, closest = search(work, hw, requested, fixed, args.lora_rank)
    except ValueError as err:
        raise UserError(str(err)) from None
    chosen = best or closest
    seq_flags = f"--max_prompt_seq_len {args.max_prompt_seq_len} --max_answer_seq_len {args.max_answer_seq_len}"
    out: dict[str, Any] = {
        "fits": best is not None,
        "flags": f"{chosen.knobs.flags()} {seq_flags}",
        "peak_gb": {k: round(v, 2) for k, v in chosen.prediction.peak_gb().items()},
        "host_gb_per_node": round(chosen.prediction.host_gb() * hw.ranks_per_node, 2),
        "usable_gb_per_gpu": round(hw.usable_gb, 2),
        "models": {"actor": args.actor_model, "critic": args.critic_model or args.actor_model,
                   "actor_params": actor.params, "critic_params": critic.params},
        "algorithm": {"advantage_estimator": work.advantage_estimator,
                      "n_samples_per_prompt": work.n_samples_per_prompt,
                      "roles": [r for r in chosen.prediction.roles if r != "workspace"]},
        "hardware": {"num_gpus": args.num_gpus, "gpu_memory_gb": args.gpu_memory_gb,
                     "host_memory_gb": args.host_memory_gb},
        "breakdown": chosen.prediction.to_json()["phases"],
    }
    if best is None:
        out["needs_gb_more_per_gpu"] = round(max(chosen.prediction.peak_gb().values()) - hw.usable_gb, 2)
        out["num_gpus_that_fit"] = _gpus_that_fit(work, hw, requested, fixed, args.lora_rank)
    return out


def _gpus_that_fit(work: Workload, hw: Hardware, requested: Knobs, fixed: dict[str, Any], lora_rank: int
                   ) -> int | None:
    """The fewest GPUs of this size (up to 64) on which some settings fit, or None."""
    import dataclasses

    n = hw.num_gpus * 2
    while n <= 64:
        best, _ = search(dataclasses.replace(work, world_size=n), dataclasses.replace(hw, num_gpus=n), requested,
                         fixed, lora_rank)
        if best is not None:
            return n
        n *= 2
    return None


def render(answer: dict[str, Any]) -> str:
    """The human-readable table of `plan`'s answer."""
    m, hw, algo = answer["models"], answer["hardware"], answer["algorithm"]
    lines = [f"actor {m['actor']} ({m['actor_params'] / 1e9:.2f}B), critic {m['critic']} "
             f"({m['critic_params'] / 1e9:.2f}B) on {hw['num_gpus']} x {hw['gpu_memory_gb']:g} GiB GPUs "
             f"({answer['usable_gb_per_gpu']:g} GiB usable each)",
             f"{algo['advantage_estimator']}, {algo['n_samples_per_prompt']} answer(s) per prompt; roles: "
             f"{', '.join(algo['roles'])}"]
    if answer["fits"]:
        lines.append("fits. The cheapest settings that fit, as step-3 flags:")
    else:
        lines.append(f"does not fit: needs {answer['needs_gb_more_per_gpu']:.1f} GiB more per GPU even with the "
                     "settings closest to fitting:")
    lines.append(f"  {answer['flags']}")
    lines += [""] + phase_table(answer)
    if not answer["fits"]:
        more = answer.get("num_gpus_that_fit")
        lines.append(f"add GPUs ({more} x {hw['gpu_memory_gb']:g} GiB would fit)" if more else
                     "no GPU count up to 64 fits")
        lines.append("or shorten --max_prompt_seq_len / --max_answer_seq_len, use a smaller critic, or free the "
                     "flags you fixed")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    step, rest = _step_of(argv)
    if step == "dpo":
        from engine.planner import dpo_cli

        dpo_cli.main(rest)
        return
    args = build_parser().parse_args(argv)
    if args.list_models:
        print("\n".join(shipped_models()))
        return
    answer = plan(args)
    print(json.dumps(answer, indent=1) if args.json else render(answer))
    if not answer["fits"]:
        sys.exit(1)


def _step_of(argv: list[str]) -> tuple[str, list[str]]:
    """(the --step asked for, the other arguments): --step dpo hands them to the DPO planner's parser."""
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--step", choices=STEPS, default="3")
    known, rest = pre.parse_known_args(argv)
    return known.step, rest


if __name__ == "__main__":
    run_main(main)
