"""GRPO beside TRL's GRPOTrainer on the bundled sorting task: held-out rule success against completions seen,
and time per optimizer step, for both trainers and several seeds, interleaved in one run.

    pip install -e ".[trl]"                       # TRL is an optional extra (tested: see TRL_REQUIREMENT)
    OMP_NUM_THREADS=1 python benchmarks/trl_grpo_compare.py --out trl_compare.json
    # from an SFT model of your own, a smaller budget
    python benchmarks/trl_grpo_compare.py --sft_model output/step1_sft --steps 20 --seeds 1 --out a.json

Both trainers start from the same step-1 model (`--sft_model`, or one built here by step1_sft/main.py from the
built-in tiny model, as the GRPO learning test builds it), train on the bundled task's training prompts with
the rule reward `engine.rewards.builtin:sort_rule`, and share every setting that matters (`settings` in the
JSON): group size, sampling (temperature 1, top_p 1, top_k 0), learning rate (constant, no warm-up), Adam
betas, gradient clip, batch (`--prompts_per_step` prompts x `--group_size` completions: TRL counts
`per_device_train_batch_size` in completions), answer length, one optimizer step per generation, fp32, no
gradient checkpointing, KL off (beta 0 / --kl_ctl 0, so neither builds a reference), and the loss
aggregation: our default token-mean over the global batch is TRL's `loss_type="dapo"` (its sum over the
tokens divided by the active tokens of the whole generation batch; TRL's "grpo" would average per sequence
first). TRL's own defaults that differ (bf16, gradient checkpointing, learning rate 1e-6, linear decay, Adam
beta2 0.999) are overridden.

Each (seed, trainer) run is a subprocess of this script (`--worker`); the order of the two trainers
alternates between seeds. Ours drives step 3's own PPO step (`step3_rlhf.main.build` / `ppo_step`) on one
rank; TRL's runs `GRPOTrainer.train()`. Only the training steps are timed (generation, scoring, update and
optimizer step; TRL: from `on_step_begin` to `on_step_end`), the start-up (imports, model load, data) is
reported apart. Every `--eval_every` steps the same function (`rule_success`) samples answers to the same
held-out prompts with the same seed and checks them with the task's rule, for either actor. The report is
JSON (printed as one line, and `--out`) and a Markdown table (`--markdown`, default: `--out` with .md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages (engine, step3_rlhf)
    sys.path.insert(0, str(ROOT))

from engine.errors import UserError  # noqa: E402
from engine.runtime.entry import run_main  # noqa: E402

logger = logging.getLogger("engine")
TRL_REQUIREMENT = "trl>=1.16.0,<1.17"  # setup.py's `trl` extra; the versions this script was run with
RULE = "engine.rewards.builtin:sort_rule"
TRAINERS = ("ours", "trl")
BUNDLE = ROOT / "engine" / "assets" / "synthetic_sort"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sft_model", default=None, help="The step-1 model both trainers start from. Default: build "
                   "one into --work_dir/sft with step1_sft/main.py from the built-in tiny model.")
    p.add_argument("--work_dir", default="output/trl_grpo_compare", help="Run folders (replaced) and the SFT model.")
    p.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    p.add_argument("--steps", type=int, default=60, help="Optimizer steps of each run (one per prompt batch).")
    p.add_argument("--prompts_per_step", type=int, default=8)
    p.add_argument("--group_size", type=int, default=8, help="Completions per prompt (GRPO's N).")
    p.add_argument("--learning_rate", type=float, default=1e-3, help="Constant, no warm-up, for both.")
    p.add_argument("--max_answer_len", type=int, default=16, help="New tokens per completion.")
    p.add_argument("--max_prompt_len", type=int, default=32, help="Our --max_prompt_seq_len (the task's fit).")
    p.add_argument("--eval_every", type=int, default=10, help="Evaluate every N optimizer steps (and at 0).")
    p.add_argument("--eval_prompts", type=int, default=128, help="Held-out prompts per evaluation (>= 64).")
    p.add_argument("--eval_seed", type=int, default=4321, help="Sampling seed of every evaluation.")
    p.add_argument("--out", default=None, help="Write the JSON report here.")
    p.add_argument("--markdown", default=None, help="Write the Markdown report here. Default: --out with .md.")
    p.add_argument("--worker", choices=TRAINERS, default=None, help=argparse.SUPPRESS)  # one run, internal
    p.add_argument("--seed", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(list(argv))
    if min(args.steps, args.prompts_per_step, args.eval_every, args.max_answer_len, args.max_prompt_len) < 1:
        raise UserError("--steps, --prompts_per_step, --eval_every, --max_answer_len and --max_prompt_len must be >= 1")
    if args.group_size < 2:
        raise UserError(f"--group_size {args.group_size}: GRPO needs at least 2 completions per prompt")
    if args.eval_prompts < 64:
        raise UserError(f"--eval_prompts {args.eval_prompts}: use 64 or more (one eval of 64 has a standard error "
                        "of about 0.06)")
    return args


def require_trl() -> str:
    """TRL's version; a UserError saying how to install it when it is missing or outside the tested range."""
    from packaging.requirements import Requirement

    try:
        import trl
    except ImportError as err:
        raise UserError(f"TRL is not installed ({err}); this benchmark needs the optional extra: "
                        f"pip install -e \".[trl]\" (or pip install \"{TRL_REQUIREMENT}\")") from None
    req = Requirement(TRL_REQUIREMENT)
    if not req.specifier.contains(trl.__version__, prereleases=True):
        raise UserError(f"TRL {trl.__version__} is installed; this benchmark is tested with {TRL_REQUIREMENT}: "
                        f"pip install \"{TRL_REQUIREMENT}\"")
    return trl.__version__


# ----------------------------------------------------------------------------------------------
# Data and the shared evaluation
# ----------------------------------------------------------------------------------------------
def bundled_prompts(split: str) -> list[str]:
    """The bundled task's prompts of `split` ("train" or "eval"), in file order."""
    path = BUNDLE / f"{split}.jsonl"
    return [json.loads(line)["prompt"] for line in path.read_text().splitlines() if line.strip()]


def rule_success(model: Any, tokenizer: Any, prompts: list[str], *, max_new_tokens: int, seed: int,
                 batch_size: int = 64) -> float:
    """The share of `prompts` whose sampled answer (temperature 1, top_p 1, top_k 0, from `seed`) is right by the
    task's rule; the same for either trainer's model. Prompts are left-padded to their longest (step 3's
    convention: answers start at one position), answers end at their first eos (`sequence_masks`). The
    caller's RNG state and the model's train/eval mode are restored."""
    import torch

    from engine.data.prompts import collate_left_padded
    from engine.eval.compare import rule_checks
    from engine.ppo.experience import sequence_masks

    pad, eos = tokenizer.pad_token_id, tokenizer.eos_token_id
    ids = [torch.tensor(tokenizer(p)["input_ids"]) for p in prompts]
    width = max(len(i) for i in ids)
    device = next(model.parameters()).device
    was_training, correct = model.training, 0
    model.eval()
    with torch.no_grad(), torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        torch.manual_seed(seed)
        for start in range(0, len(ids), batch_size):
            batch = {k: v.to(device) for k, v in collate_left_padded(ids[start:start + batch_size], pad, width).items()}
            sequences = model.generate(**batch, max_new_tokens=max_new_tokens, do_sample=True, temperature=1.0,
                                       top_p=1.0, top_k=0, pad_token_id=pad, eos_token_id=eos)
            mask, _ = sequence_masks(sequences, width, pad, eos, batch["attention_mask"])
            answers = [tokenizer.decode(s[width:][m[width:].bool()], skip_special_tokens=True)
                       for s, m in zip(sequences, mask)]
            correct += int(rule_checks(prompts[start:start + batch_size], answers)[1].sum())
    model.train(was_training)
    return correct / len(prompts)


class Curve:
    """The evaluations of one run: (optimizer step, completions seen, rule success)."""

    def __init__(self, args: argparse.Namespace, tokenizer: Any) -> None:
        self.args, self.tokenizer, self.points, self.seconds = args, tokenizer, [], 0.0
        self.prompts = bundled_prompts("eval")[:args.eval_prompts]
        if len(self.prompts) < args.eval_prompts:
            raise UserError(f"--eval_prompts {args.eval_prompts}: the bundled task has {len(self.prompts)} held-out "
                            "prompts")

    def maybe_eval(self, model: Any, step: int) -> None:
        if step % self.args.eval_every and step != self.args.steps:
            return
        a, start = self.args, time.perf_counter()
        success = rule_success(model, self.tokenizer, self.prompts, max_new_tokens=a.max_answer_len, seed=a.eval_seed)
        self.seconds += time.perf_counter() - start
        self.points.append({"step": step, "completions": step * a.prompts_per_step * a.group_size,
                            "rule_success": success})
        logger.info("step %d: held-out rule success %.3f", step, success)


# ----------------------------------------------------------------------------------------------
# The two workers (one run each, in a subprocess of the driver)
# ----------------------------------------------------------------------------------------------
def our_argv(args: argparse.Namespace, out: Path) -> list[str]:
    """step3_rlhf/main.py's flags for the matched GRPO run."""
    n = args.prompts_per_step * args.group_size
    return ["--actor_model_name_or_path", args.sft_model, "--output_dir", str(out), "--advantage_estimator", "grpo",
            "--n_samples_per_prompt", str(args.group_size), "--reward_funcs", RULE, "--data_split", "0,0,1",
            "--max_prompt_seq_len", str(args.max_prompt_len), "--max_answer_seq_len", str(args.max_answer_len),
            "--per_device_generation_batch_size", str(args.prompts_per_step),
            "--per_device_training_batch_size", str(n), "--actor_learning_rate", str(args.learning_rate),
            "--lr_scheduler_type", "constant", "--num_warmup_steps", "0", "--dtype", "fp32", "--kl_ctl", "0",
            "--temperature", "1.0", "--top_p", "1.0", "--top_k", "0", "--loss_agg_mode", "token-mean",
            "--seed", str(args.seed), "--disable_tqdm"]


def run_ours(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """Step 3's GRPO: `build`, then its own `ppo_step` per optimizer step, timed; evaluations between steps."""
    from engine.config import Step3Config
    from engine.flags import parse_config
    from engine.models.load import hf_model
    from engine.runtime.bad_steps import BadStepGuard
    from engine.runtime.run import epoch_windows
    from step3_rlhf import main as step3

    run = step3.build(parse_config(Step3Config, our_argv(args, out)))
    if run.plan.micro_batches != 1 or run.plan.steps.steps_per_epoch < args.steps:
        raise UserError(f"step 3 planned {run.plan.micro_batches} micro-batches per step and "
                        f"{run.plan.steps.steps_per_epoch} steps per epoch; this comparison needs 1 and >= --steps")
    model = hf_model(run.roles.actor.module)
    curve, times, phases = Curve(args, run.tokenizer), [], {}
    curve.maybe_eval(model, 0)
    guard = BadStepGuard(run.cfg.fault.max_bad_steps, namespace="ppo", step_name="PPO step")
    windows = epoch_windows(run.prompt_loader, 0, 0, run.cfg.train.generation_batches)
    for step in range(1, args.steps + 1):
        start = time.perf_counter()
        row = step3.ppo_step(run, next(windows)[1], None, step, guard)
        times.append(time.perf_counter() - start)
        for k in ("generate", "experience", "train"):  # step 3's own split of the step (seconds)
            phases.setdefault(k, []).append(row[f"timing/{k}_s"])
        curve.maybe_eval(model, step)
    run.metrics.close()
    return {"curve": curve.points, "step_s": times, "eval_s": curve.seconds,
            "phase_s_median": {k: statistics.median(v) for k, v in phases.items()}}


def trl_config(args: argparse.Namespace, out: Path) -> Any:
    """GRPOConfig matched to `our_argv` (TRL's differing defaults overridden, each named)."""
    from trl import GRPOConfig

    return GRPOConfig(
        output_dir=str(out), seed=args.seed, max_steps=args.steps, use_cpu=True, report_to=[], save_strategy="no",
        logging_steps=args.steps, disable_tqdm=True, dataloader_num_workers=0,
        bf16=False, fp16=False, gradient_checkpointing=False,            # TRL: bf16 on, checkpointing on
        per_device_train_batch_size=args.prompts_per_step * args.group_size,  # in completions
        num_generations=args.group_size, gradient_accumulation_steps=1, steps_per_generation=1, num_iterations=1,
        learning_rate=args.learning_rate, lr_scheduler_type="constant", warmup_steps=0,  # TRL: 1e-6, linear
        optim="adamw_torch", adam_beta1=0.9, adam_beta2=0.95, adam_epsilon=1e-8,  # ours: beta2 0.95 (TRL 0.999)
        weight_decay=0.0, max_grad_norm=1.0,
        beta=0.0, loss_type="dapo", scale_rewards="group", epsilon=0.2,  # dapo = our token-mean; std per group
        temperature=1.0, top_p=1.0, top_k=0, max_completion_length=args.max_answer_len)


def run_trl(args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """TRL's GRPOTrainer on the bundled training prompts; a callback times each step and evaluates."""
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from engine.rewards.builtin import sort_rule

    tokenizer = AutoTokenizer.from_pretrained(args.sft_model)
    model = AutoModelForCausalLM.from_pretrained(args.sft_model, dtype=torch.float32)
    curve, times = Curve(args, tokenizer), []

    class Timed(TrainerCallback):
        def on_step_begin(self, *_, **__) -> None:
            self.start = time.perf_counter()

        def on_step_end(self, _args, state, *_, **__) -> None:
            times.append(time.perf_counter() - self.start)
            curve.maybe_eval(model, state.global_step)

    curve.maybe_eval(model, 0)
    trainer = GRPOTrainer(model=model, reward_funcs=sort_rule, args=trl_config(args, out),
                          train_dataset=Dataset.from_dict({"prompt": bundled_prompts("train")}),
                          processing_class=tokenizer, callbacks=[Timed()])
    trainer.train()
    return {"curve": curve.points, "step_s": times, "eval_s": curve.seconds}


def worker(args: argparse.Namespace) -> None:
    """One (trainer, seed) run: its result as JSON in --result."""
    began, load_before = time.perf_counter(), os.getloadavg()[0]
    import torch
    import transformers

    out = Path(args.work_dir) / f"{args.worker}_seed{args.seed}"
    shutil.rmtree(out, ignore_errors=True)
    versions = {"torch": torch.__version__, "transformers": transformers.__version__}
    if args.worker == "trl":
        versions["trl"] = require_trl()
        result = run_trl(args, out)
    else:
        import deepspeed

        versions["deepspeed"] = deepspeed.__version__
        result = run_ours(args, out)
    total = time.perf_counter() - began
    from engine.runtime.atomic import write_atomically

    # start-up: what is neither a timed step nor an evaluation (imports, model and data loading, set-up; not
    # the interpreter's own start). The 1-minute load average before and after: what the times were beside.
    result |= {"trainer": args.worker, "seed": args.seed, "versions": versions, "wall_s": total,
               "load_average": [load_before, os.getloadavg()[0]],
               "startup_s": total - sum(result["step_s"]) - result["eval_s"]}
    write_atomically(Path(args.result), json.dumps(result))


# ----------------------------------------------------------------------------------------------
# The driver and the report
# ----------------------------------------------------------------------------------------------
def build_sft(args: argparse.Namespace) -> str:
    """The step-1 model of the GRPO learning test (tests/smoke/test_step3_grpo.py), built once into --work_dir."""
    folder = Path(args.work_dir) / "sft"
    if (folder / "config.json").exists():
        logger.info("reusing the SFT model in %s", folder)
        return str(folder)
    shutil.rmtree(folder, ignore_errors=True)
    cmd = [sys.executable, str(ROOT / "step1_sft" / "main.py"), "--output_dir", str(folder),
           "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16", "--max_seq_len", "64",
           "--learning_rate", "3e-3", "--num_train_epochs", "2", "--seed", "1234", "--dtype", "fp32", "--disable_tqdm"]
    logger.info("building the SFT model: %s", " ".join(cmd))
    subprocess.run(cmd, check=True, cwd=ROOT)
    return str(folder)


SHARED = ("work_dir", "steps", "prompts_per_step", "group_size", "learning_rate", "max_answer_len", "max_prompt_len",
          "eval_every", "eval_prompts", "eval_seed")  # the settings a worker gets from the driver


def launch(args: argparse.Namespace, trainer: str, seed: int) -> dict[str, Any]:
    """One worker subprocess (this interpreter, so TRL is the one the driver checked)."""
    result = Path(args.work_dir) / f"result_{trainer}_seed{seed}.json"
    result.unlink(missing_ok=True)
    shared = [x for name in SHARED for x in (f"--{name}", str(getattr(args, name)))]
    cmd = [sys.executable, str(Path(__file__).resolve()), *shared, "--sft_model", args.sft_model,
           "--worker", trainer, "--seed", str(seed), "--result", str(result)]
    logger.info("run: %s, seed %d", trainer, seed)
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0 or not result.exists():
        raise UserError(f"the {trainer} run (seed {seed}) failed with exit status {proc.returncode}; its log is above")
    return json.loads(result.read_text())


def settings(args: argparse.Namespace) -> dict[str, Any]:
    return {name: getattr(args, name) for name in SHARED if name != "work_dir"} | {
        "seeds": list(args.seeds), "sft_model": args.sft_model, "reward": RULE, "temperature": 1.0, "top_p": 1.0,
        "top_k": 0, "dtype": "fp32", "gradient_checkpointing": False, "kl": 0.0, "lr_schedule": "constant",
        "adam_betas": [0.9, 0.95], "max_grad_norm": 1.0, "optimizer_steps_per_generation": 1,
        "loss_aggregation": {"ours": "--loss_agg_mode token-mean", "trl": "loss_type='dapo'"},
        "batch": {"ours": f"--per_device_generation_batch_size {args.prompts_per_step} "
                          f"--n_samples_per_prompt {args.group_size} --per_device_training_batch_size "
                          f"{args.prompts_per_step * args.group_size}",
                  "trl": f"per_device_train_batch_size={args.prompts_per_step * args.group_size} "
                         f"num_generations={args.group_size}"}}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per trainer: the seed-mean curve, mean final success, and the median step time over all its steps."""
    out: dict[str, dict[str, Any]] = {}
    for trainer in TRAINERS:
        mine = [r for r in runs if r["trainer"] == trainer]
        if not mine:
            continue
        steps = [p["step"] for p in mine[0]["curve"]]
        mean_curve = [statistics.fmean(r["curve"][i]["rule_success"] for r in mine) for i in range(len(steps))]
        times = [t for r in mine for t in r["step_s"]]
        out[trainer] = {"curve_steps": steps, "curve_completions": [p["completions"] for p in mine[0]["curve"]],
                        "mean_curve": mean_curve, "final_success_mean": mean_curve[-1],
                        "trained_success_mean": statistics.fmean(mean_curve[1:]) if len(steps) > 1 else None,
                        "step_s_median": statistics.median(times), "step_s_mean": statistics.fmean(times),
                        "startup_s_mean": statistics.fmean(r["startup_s"] for r in mine)}
    return out


def verdict(summary: dict[str, dict[str, Any]]) -> dict[str, bool] | None:
    """The goal of issue 16: our curve at least as high (the seed mean at every evaluation after step 0) and our
    step faster (median step time)."""
    if set(summary) != set(TRAINERS):
        return None
    ours, trl = summary["ours"], summary["trl"]
    higher = all(o >= t for o, t in zip(ours["mean_curve"][1:], trl["mean_curve"][1:]))
    return {"curve_at_least_as_high": higher, "step_faster": ours["step_s_median"] < trl["step_s_median"]}


def build_report(runs: list[dict[str, Any]], config: dict[str, Any]) -> dict[str, Any]:
    """The JSON report of finished runs (each a worker's result)."""
    runs = sorted(runs, key=lambda r: (r["trainer"], r["seed"]))
    summary = summarize(runs)
    return {"benchmark": "trl_grpo_compare", "settings": config, "runs": runs, "summary": summary,
            "verdict": verdict(summary)}


def markdown(report: dict[str, Any]) -> str:
    """The report as Markdown: rule success per evaluation (rows: trainer and seed, then the seed mean) and the
    step times."""
    runs, summary = report["runs"], report["summary"]
    completions = next(iter(summary.values()))["curve_completions"] if summary else []
    head = ["trainer", "seed", *(f"{c} compl." for c in completions), "step s (median)", "start-up s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in runs:
        cells = [r["trainer"], str(r["seed"]), *(f"{p['rule_success']:.3f}" for p in r["curve"]),
                 f"{statistics.median(r['step_s']):.3f}", f"{r['startup_s']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for trainer, s in summary.items():
        cells = [f"**{trainer}**", "mean", *(f"**{v:.3f}**" for v in s["mean_curve"]),
                 f"**{s['step_s_median']:.3f}**", f"{s['startup_s_mean']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    for trainer, s in summary.items():
        trained = "n/a" if s["trained_success_mean"] is None else f"{s['trained_success_mean']:.3f}"
        lines.append(f"\n{trainer}: mean rule success over the evaluations after step 0 {trained}, at the last "
                     f"{s['final_success_mean']:.3f}; median step {s['step_s_median']:.3f} s "
                     f"(mean {s['step_s_mean']:.3f} s).")
    v = report["verdict"]
    if v is not None:
        yes = {True: "yes", False: "no"}
        lines += ["", f"Our curve at least as high at every evaluation: **{yes[v['curve_at_least_as_high']]}**; "
                  f"our step faster: **{yes[v['step_faster']]}**."]
    return "\n".join(lines) + "\n"


def drive(args: argparse.Namespace) -> dict[str, Any]:
    trl_version = require_trl()  # before anything is built or written: a missing TRL costs nothing
    if args.sft_model is not None and not (Path(args.sft_model) / "config.json").exists():
        raise UserError(f"--sft_model {args.sft_model}: not a model folder (no config.json); give step 1's output")
    Path(args.work_dir).mkdir(parents=True, exist_ok=True)
    args.sft_model = args.sft_model or build_sft(args)
    runs = []
    for i, seed in enumerate(args.seeds):  # interleaved: the order of the trainers alternates
        for trainer in (TRAINERS if i % 2 == 0 else TRAINERS[::-1]):
            runs.append(launch(args, trainer, seed))
    config = settings(args) | {"trl": trl_version, "python": platform.python_version(),
                               "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
                               "omp_num_threads": os.environ.get("OMP_NUM_THREADS")}
    return build_report(runs, config)


def main(argv: Sequence[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s", datefmt="%H:%M:%S")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    if args.worker is not None:
        if args.seed is None or args.result is None or args.sft_model is None:
            raise UserError("--worker needs --seed, --result and --sft_model (the driver passes them)")
        worker(args)
        return
    report = drive(args)
    print(json.dumps(report))
    text = markdown(report)
    print(text)
    if args.out:
        from engine.runtime.atomic import write_atomically

        write_atomically(Path(args.out), json.dumps(report, indent=1) + "\n")
        write_atomically(Path(args.markdown or Path(args.out).with_suffix(".md")), text)


if __name__ == "__main__":
    run_main(main)
