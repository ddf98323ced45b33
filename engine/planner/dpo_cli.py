"""Will this DPO run fit, and with which flags?

    python -m engine.planner --step dpo --model llama-2-7b --num_gpus 1 --gpu_memory_gb 24 \\
        --max_seq_len 512 --per_device_train_batch_size 8

Add --json for one JSON object. Models: a shipped config name (python -m engine.planner --list_models) or
a Hugging Face folder. DPO flags given here (--zero_stage 3, --offload, --lora_dim 8,
--precompute_ref_logps, ...) are kept as given; the planner searches the others for the cheapest settings
that fit: fewest offloads, no quantized reference, full fine-tuning before LoRA, the requested micro-batch
(halved until it fits), no gradient checkpointing, a live reference before precomputed log-probs, the
lowest ZeRO stage. With LoRA and --only_optimize_lora the reference is the policy with its adapters off.
Exit status 0 when something fits, 1 when nothing does (the message says how much is missing).
"""
from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from typing import Any

from engine.config import DPOConfig
from engine.errors import UserError
from engine.flags import leaf_fields
from engine.helptext import HelpFormatter
from engine.planner.cli import add_hardware_args, hardware_of, parse_bool, phase_table
from engine.planner.dpo import LORA_DIMS, DPOKnobs, DPOWorkload, search_dpo
from engine.planner.plan import couple_lora
from engine.planner.shapes import load_config, model_shape_of

# The DPO main's memory flags (type, choices and help from its config's fields); absent means "the planner
# chooses".
KNOB_FLAGS = ("zero_stage", "offload", "gradient_checkpointing", "lora_dim", "only_optimize_lora",
              "offload_reference_model", "reference_quantization", "precompute_ref_logps")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m engine.planner --step dpo", description=__doc__,
                                formatter_class=HelpFormatter)
    p.add_argument("--model", help="shipped config name or model folder of the policy (and its reference)")
    add_hardware_args(p)
    p.add_argument("--max_seq_len", type=int, default=512, help="tokens per sequence (prompt + answer)")
    p.add_argument("--per_device_train_batch_size", type=int, default=16, help="pairs per micro-batch: the most to try")
    p.add_argument("--dtype", default="bf16", choices=("bf16", "fp16", "fp32"),
                   help="the training dtype (fp16 and bf16 plan alike: two bytes each)")
    p.add_argument("--logprob_chunk_size", type=int, default=None, help="as the DPO step's (default: automatic)")
    p.add_argument("--lora_rank", type=int, default=64, help="LoRA rank the search uses when it turns LoRA on")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    fixed = p.add_argument_group("DPO flags to keep (the planner chooses those not given)")
    leaves = leaf_fields(DPOConfig)
    for name in KNOB_FLAGS:
        _, f, tp = leaves[name]
        text = f.metadata["help"].replace("%", "%%")
        if tp is bool:
            fixed.add_argument(f"--{name}", type=parse_bool, nargs="?", const=True, metavar="true|false", help=text)
        else:
            fixed.add_argument(f"--{name}", type=tp, choices=f.metadata["choices"], help=text)
    return p


def plan(args: argparse.Namespace) -> dict[str, Any]:
    """The planner's answer for a DPO run as a JSON-able dict."""
    if not args.model:
        raise UserError("give --model (a shipped config name or a model folder); python -m engine.planner "
                        "--list_models lists the names")
    hw = hardware_of(args)
    if args.max_seq_len < 1 or args.per_device_train_batch_size < 1:
        raise UserError("--max_seq_len and --per_device_train_batch_size must be at least 1")
    shape = model_shape_of(load_config(args.model))
    work = DPOWorkload(shape, args.max_seq_len, args.num_gpus)
    requested = DPOKnobs(per_device_train_batch_size=args.per_device_train_batch_size, dtype=args.dtype,
                         logprob_chunk_size=args.logprob_chunk_size)
    fixed = couple_lora({n: getattr(args, n) for n in KNOB_FLAGS if getattr(args, n) is not None}, args.lora_rank,
                        LORA_DIMS)
    bad = DPOKnobs(**fixed).problems()
    if bad:
        raise UserError("the given DPO flags do not go together: " + "; ".join(bad))
    try:
        best, closest = search_dpo(work, hw, requested, fixed, args.lora_rank)
    except ValueError as err:
        raise UserError(str(err)) from None
    chosen = best or closest
    out: dict[str, Any] = {
        "fits": best is not None,
        "flags": f"{chosen.knobs.flags()} --max_seq_len {args.max_seq_len}",
        "reference": chosen.knobs.reference_mode(work),
        "peak_gb": {k: round(v, 2) for k, v in chosen.prediction.peak_gb().items()},
        "host_gb_per_node": round(chosen.prediction.host_gb() * hw.ranks_per_node, 2),
        "usable_gb_per_gpu": round(hw.usable_gb, 2),
        "models": {"policy": args.model, "policy_params": shape.params},
        "hardware": {"num_gpus": args.num_gpus, "gpu_memory_gb": args.gpu_memory_gb,
                     "host_memory_gb": args.host_memory_gb},
        "breakdown": chosen.prediction.to_json()["phases"],
    }
    if best is None:
        out["needs_gb_more_per_gpu"] = round(max(chosen.prediction.peak_gb().values()) - hw.usable_gb, 2)
    return out


def render(answer: dict[str, Any]) -> str:
    """The human-readable table of `plan`'s answer."""
    m, hw = answer["models"], answer["hardware"]
    lines = [f"DPO: policy {m['policy']} ({m['policy_params'] / 1e9:.2f}B) on {hw['num_gpus']} x "
             f"{hw['gpu_memory_gb']:g} GiB GPUs ({answer['usable_gb_per_gpu']:g} GiB usable each); reference: "
             f"{answer['reference']}"]
    if answer["fits"]:
        lines.append("fits. The cheapest settings that fit, as DPO flags:")
    else:
        lines.append(f"does not fit: needs {answer['needs_gb_more_per_gpu']:.1f} GiB more per GPU even with the "
                     "settings closest to fitting:")
    lines += [f"  {answer['flags']}", ""] + phase_table(answer)
    if not answer["fits"]:
        lines.append("add GPUs, shorten --max_seq_len, or free the flags you fixed")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    answer = plan(args)
    print(json.dumps(answer, indent=1) if args.json else render(answer))
    if not answer["fits"]:
        sys.exit(1)
