"""What the planner's command lines share (`python -m engine.planner`, step 3's and `--step dpo`): the
machine's flags, true/false values, and the table of GiB per phase."""
from __future__ import annotations

import argparse
from typing import Any

from engine.errors import UserError
from engine.planner.plan import Hardware


def parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true or false, not {text!r}")


def add_hardware_args(p: argparse.ArgumentParser) -> None:
    """The machine to plan for: --num_gpus, --gpu_memory_gb, --host_memory_gb, --gpus_per_node, --usable_fraction."""
    p.add_argument("--num_gpus", type=int, default=1, help="GPUs in all (ranks)")
    p.add_argument("--gpu_memory_gb", type=float, default=80.0, help="memory of each GPU, GiB")
    p.add_argument("--host_memory_gb", type=float, default=256.0, help="host memory per node, GiB")
    p.add_argument("--gpus_per_node", type=int, default=8)
    p.add_argument("--usable_fraction", type=float, default=0.9,
                   help="share of each GPU (and host) a plan may fill; the rest is for the CUDA context, "
                        "communication buffers and fragmentation")


def hardware_of(args: argparse.Namespace) -> Hardware:
    """The `Hardware` of the flags `add_hardware_args` adds (checked)."""
    if args.num_gpus < 1:
        raise UserError(f"--num_gpus must be at least 1, not {args.num_gpus}")
    if args.gpu_memory_gb <= 0 or args.host_memory_gb <= 0:
        raise UserError("--gpu_memory_gb and --host_memory_gb must be positive")
    return Hardware(args.num_gpus, args.gpu_memory_gb, args.host_memory_gb, args.gpus_per_node, args.usable_fraction)


def phase_table(answer: dict[str, Any]) -> list[str]:
    """Lines of the GiB-per-GPU table of an answer's "breakdown" (part by phase), its peaks and host memory."""
    phases, hw = list(answer["peak_gb"]), answer["hardware"]
    parts = sorted({k for ph in answer["breakdown"].values() for k, v in ph.items() if v["gpu"] > 0.005})
    width = max(len(p) for p in parts + ["peak"])
    lines = [f"{'GiB per GPU':<{width}}  " + "  ".join(f"{ph:>12}" for ph in phases)]
    for part in parts:
        cells = [answer["breakdown"][ph].get(part, {"gpu": 0.0})["gpu"] for ph in phases]
        lines.append(f"{part:<{width}}  " + "  ".join(f"{c:>12.2f}" if c else f"{'-':>12}" for c in cells))
    lines.append(f"{'peak':<{width}}  " + "  ".join(f"{answer['peak_gb'][ph]:>12.2f}" for ph in phases))
    lines.append(f"host memory per node: {answer['host_gb_per_node']:.1f} GiB of {hw['host_memory_gb']:g}")
    return lines
