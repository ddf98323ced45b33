"""Each critic-free estimator's learning curve on the bundled task, on the same budget, from one SFT model.

    python e2e_rlhf.py --step 1                       # the demo's step-1 model in output/step1_sft
    python benchmarks/estimator_curves.py --sft output/step1_sft --steps 125 --out curves.json

Every variant runs `step3_rlhf/training_scripts/tiny/run_demo_critic_free.sh` (the pipeline's critic-free
step 3: 8 answers per prompt, 8 prompts per rank on 2 CPU ranks, the rule as the reward, lr 3e-4, no KL) for
`--steps` steps, with the held-out rule success (`eval/rule_success`, 400 prompts, sampled with the fixed eval
seed) every `--eval_interval` steps. Variants: the six estimators, DAPO (grpo with clip-higher 0.28, dynamic
sampling, truncated answers masked) and GSPO (grpo's advantages, sequence-level ratios). Prints JSON (also to
--out) and a Markdown table: per variant the curve, the last value, the seconds of the run and its generated
answers (remax: plus one greedy answer per prompt; DAPO: plus its extra generation batches).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from engine.errors import UserError  # noqa: E402
from engine.observe.metrics import read_metrics  # noqa: E402
from engine.runtime.entry import run_main  # noqa: E402

SCRIPT = ROOT / "step3_rlhf" / "training_scripts" / "tiny" / "run_demo_critic_free.sh"
# name: (estimator, extra step-3 flags)
VARIANTS = {
    "grpo": ("grpo", []),
    "dr_grpo": ("dr_grpo", ["--loss_agg_mode", "seq-mean-token-sum-norm"]),
    "rloo": ("rloo", []),
    "reinforce_pp": ("reinforce_pp", []),
    "reinforce_pp_baseline": ("reinforce_pp_baseline", []),
    "remax": ("remax", []),
    "dapo": ("grpo", ["--cliprange_low", "0.2", "--cliprange_high", "0.28", "--dynamic_sampling",
                      "--mask_truncated_answers"]),
    "gspo": ("grpo", ["--policy_loss", "gspo", "--loss_agg_mode", "seq-mean-token-mean"]),
}


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft", default="output/step1_sft", help="The step-1 model every variant starts from.")
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--steps", type=int, default=125, help="PPO steps per variant (the same budget for all).")
    p.add_argument("--eval_interval", type=int, default=25)
    p.add_argument("--ranks", type=int, default=2)
    p.add_argument("--run_dir", default="output/estimator_curves", help="Each variant's step-3 output folder.")
    p.add_argument("--out", default=None, help="Write the JSON here too.")
    args = p.parse_args(argv)
    if not (Path(args.sft) / "config.json").is_file():
        raise UserError(f"--sft {args.sft} is not a model folder; run `python e2e_rlhf.py --step 1` first")
    if args.steps < 1 or args.eval_interval < 1 or args.ranks < 1:
        raise UserError("--steps, --eval_interval and --ranks must be >= 1")
    return args


def run_variant(args: argparse.Namespace, name: str) -> dict:
    """Run one variant to --steps and read its curve from its metrics.jsonl."""
    from engine.runtime.distributed import free_port

    estimator, extra = VARIANTS[name]
    out = Path(args.run_dir) / name
    command = ["bash", str(SCRIPT), str(Path(args.sft).resolve()), estimator, "", str(out.resolve()),
               str(args.ranks), "--test_stop_step", str(args.steps), "--eval_interval", str(args.eval_interval),
               "--disable_tqdm", *extra]
    env = {**os.environ, "MASTER_PORT": str(free_port()), "CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    start = time.perf_counter()
    proc = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        raise UserError(f"variant {name} failed (exit {proc.returncode}); the end of its log:\n{proc.stdout[-3000:]}")
    rows = read_metrics(out / "metrics.jsonl")
    curve = {r["step"]: r["eval/rule_success"] for r in rows if "eval/rule_success" in r}
    steps = [r for r in rows if "rollout/sequences" in r]
    greedy = 1.0 / 8 if estimator == "remax" else 0.0  # one greedy answer per 8 sampled
    gen_batches = sum(r.get("rollout/dynamic_gen_batches", args.ranks) for r in steps) / args.ranks
    return {"estimator": estimator, "flags": extra, "curve": curve, "last": curve[max(curve)],
            "seconds": round(seconds, 1), "answers": int(sum(r["rollout/sequences"] for r in steps) * (1 + greedy)),
            "generation_batches_per_rank": gen_batches,
            "entropy_last": steps[-1].get("ppo/entropy") if steps else None}


def markdown(results: dict[str, dict]) -> str:
    steps = sorted({s for r in results.values() for s in r["curve"]})
    lines = ["| variant | " + " | ".join(f"step {s}" for s in steps) + " | seconds | answers |",
             "|---|" + "---|" * (len(steps) + 2)]
    for name, r in results.items():
        cells = [f"{r['curve'][s]:.3f}" if s in r["curve"] else "" for s in steps]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {r['seconds']:.0f} | {r['answers']} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    results = {}
    for name in args.variants:
        print(f"running {name} ...", file=sys.stderr, flush=True)
        results[name] = run_variant(args, name)
    report = {"sft": str(args.sft), "steps": args.steps, "ranks": args.ranks, "results": results}
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(json.dumps(report))
    print(markdown(results), end="")


if __name__ == "__main__":
    run_main(main)
