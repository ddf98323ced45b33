"""Step-3 (PPO or critic-free) throughput and memory benchmark on random-weight models of any shape, no download.

    # one H200, Llama-2-7B actor and critic, LoRA, hybrid generation (A/B options after --)
    deepspeed --num_gpus 1 benchmarks/rlhf_step.py --actor_model llama-2-7b --critic_model llama-2-7b \\
        --max_prompt_seq_len 256 --max_answer_seq_len 256 --steps 4 --out bench.json \\
        -- --actor_lora_dim 64 --only_optimize_lora --enable_hybrid_engine
    # a CPU: a scaled-down Llama-2-7B shape on 2 ranks (DS_ACCELERATOR=cpu where a GPU is visible)
    OMP_NUM_THREADS=1 deepspeed --num_gpus 2 benchmarks/rlhf_step.py --actor_model llama-2-7b \\
        --num_layers 2 --hidden_size 256 --intermediate_size 688 --num_heads 4 --max_prompt_seq_len 64 \\
        --max_answer_seq_len 64 --per_device_generation_batch_size 8 --per_device_training_batch_size 8 \\
        --out cpu.json -- --actor_zero_stage 3 --critic_zero_stage 3 --enable_hybrid_engine
    # one rank without the launcher; then an A/B table of two runs
    python benchmarks/rlhf_step.py --actor_model tiny --steps 3 --out a.json
    python benchmarks/rlhf_step.py --compare a.json b.json   # --json: the same figures as JSON
    # a critic-free estimator (no critic; the critic's folder is the reward model, beside a length reward
    # that scores random text unevenly); benchmarks/compare_estimators.sh runs PPO, GRPO, RLOO and ReMax
    python benchmarks/rlhf_step.py --actor_model tiny --steps 3 --out grpo.json -- --advantage_estimator grpo \\
        --n_samples_per_prompt 4 --reward_funcs benchmarks/length_reward.py:answer_length

`--actor_model` / `--critic_model` take a shipped planner config (engine.planner.shapes.shipped_models()),
a folder with a config.json, or `tiny`; `--num_layers`, `--hidden_size`, `--intermediate_size` and
`--num_heads` scale both. Random-weight folders (engine.bench.random_models) are built once by rank 0 into
`--cache_dir` and reused. Step 3 (step3_rlhf/main.py) then runs in this process on the bundled prompts
for `--steps` PPO steps, without its evaluations and saved models; every flag after `--` goes to step 3
as it is (ZeRO stages, --offload, --enable_hybrid_engine, LoRA, quantized roles, --advantage_estimator...).
The critic's folder is always given to step 3: a PPO run trains it as the critic and scores with it as the
reward model; a critic-free run builds no critic and scores with it as the reward model (plus any
--reward_funcs), so that PPO and critic-free runs hold the same reference and reward model and differ by
the critic alone. `--no_reward_model` drops it from a critic-free run (--reward_funcs then score alone).
The report (rank 0) lists only the roles the run built, drops `--warmup_steps` steps and gives throughput
(with the time per trained sample: one rollout row the updates train on, N per prompt with
--n_samples_per_prompt N), TFLOPs and MFU, the time split, the decode step
against the HBM roofline, peak memory per phase, model states per role, and the memory planner's
prediction with its error (engine.bench.figures documents every definition). It is written as JSON (`--out`,
also printed as one line) and Markdown (`--markdown`, default: the JSON's path with .md).
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run as a script: the repository's packages (engine, step3_rlhf)
    sys.path.insert(0, str(ROOT))

from engine.bench import figures  # noqa: E402
from engine.errors import UserError  # noqa: E402
from engine.observe.metrics import read_metrics  # noqa: E402
from engine.runtime.entry import run_main  # noqa: E402

logger = logging.getLogger("engine")
LAUNCH_ENV = "RLHF_BENCH_LAUNCH_TIME"
# Step-3 flags this script sets from its own; giving them after -- would make the report disagree with the run.
OWNED_FLAGS = ("--actor_model_name_or_path", "--critic_model_name_or_path", "--output_dir", "--max_prompt_seq_len",
               "--max_answer_seq_len", "--per_device_generation_batch_size", "--per_device_training_batch_size",
               "--test_stop_step", "--dtype", "--seed", "--disable_tqdm")


def parse_args(argv: Sequence[str]) -> tuple[argparse.Namespace, list[str]]:
    """(benchmark flags, step-3 flags): everything after the first `--` goes to step 3."""
    argv = list(argv)
    split = argv.index("--") if "--" in argv else len(argv)
    own, step3_flags = argv[:split], argv[split + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--compare", nargs="+", metavar="JSON", help="Print an A/B Markdown table of these reports "
                   "(ratios against the first) and exit.")
    p.add_argument("--json", action="store_true", help="With --compare: print the comparison as JSON instead.")
    p.add_argument("--actor_model", default="tiny", help="'tiny', a shipped planner config name or a folder.")
    p.add_argument("--critic_model", default=None, help="Same choices; default: the actor's shape.")
    for flag in ("num_layers", "hidden_size", "intermediate_size", "num_heads"):
        p.add_argument(f"--{flag}", type=int, default=None, help=f"Override the {flag} of both models' configs.")
    p.add_argument("--max_prompt_seq_len", type=int, default=256)
    p.add_argument("--max_answer_seq_len", type=int, default=256)
    p.add_argument("--per_device_generation_batch_size", type=int, default=16)
    p.add_argument("--per_device_training_batch_size", type=int, default=16)
    p.add_argument("--steps", type=int, default=4, help="PPO steps to run (step 3's --test_stop_step).")
    p.add_argument("--warmup_steps", type=int, default=1, help="First PPO steps left out of the timings.")
    p.add_argument("--dtype", default=None, choices=("fp16", "bf16", "fp32"),
                   help="Dtype of the models and the run. Default: step 3's (fp16 on GPU, bf16 on CPU).")
    p.add_argument("--seed", type=int, default=1234, help="Seed of the random weights and of step 3.")
    p.add_argument("--cache_dir", default=None, help="Random-weight model folders. Default: "
                   "$RLHF_ENGINE_CACHE/bench_models (or ~/.cache/rlhf_engine/bench_models).")
    p.add_argument("--run_dir", default="output/bench_rlhf_step", help="Step 3's --output_dir (metrics, data cache).")
    p.add_argument("--out", default=None, help="Write the JSON report here.")
    p.add_argument("--markdown", default=None, help="Write the Markdown report here. Default: --out with .md.")
    p.add_argument("--peak_tflops", type=float, default=None,
                   help="Peak dense TFLOPs per device for MFU. Default: 989 on an H100/H200 in bf16/fp16, else none.")
    p.add_argument("--hbm_gb_s", type=float, default=None,
                   help="Memory bandwidth (GB/s) for the decode roofline. Default: 4800 on an H200, else none.")
    p.add_argument("--no_reward_model", action="store_true",
                   help="Critic-free runs only: no reward model (the --reward_funcs after -- score alone).")
    p.add_argument("--no_lora_arithmetic", action="store_true",
                   help="Diagnostic: each one-module LoRA layer returns its base layer's output and skips the "
                   "adapter matmuls, while the adapters stay parameters with gradients (through a zero-weighted "
                   "term), hooks and their optimizer group. Against a real LoRA run it separates what LoRA's "
                   "arithmetic costs from what its structure costs. The hybrid mode still folds the adapters.")
    p.add_argument("--local_rank", type=int, default=-1, help="Set by the deepspeed launcher; ignored.")
    args = p.parse_args(own)
    if args.json and args.compare is None:
        raise UserError("--json formats the --compare table; give --compare a.json b.json ... with it")
    if args.no_reward_model and "--reward_funcs" not in step3_flags:
        raise UserError("--no_reward_model leaves nothing to score the answers: give --reward_funcs after -- "
                        "(e.g. benchmarks/length_reward.py:answer_length) with a critic-free --advantage_estimator")
    owned = sorted({f.split("=")[0] for f in step3_flags if f.split("=")[0] in OWNED_FLAGS})
    if owned:
        raise UserError(f"{', '.join(owned)} after --: the benchmark sets these from its own flags; give "
                        "--actor_model, --max_prompt_seq_len, ... before --")
    if args.compare is None and not 0 <= args.warmup_steps < args.steps:
        raise UserError(f"--steps {args.steps} must be larger than --warmup_steps {args.warmup_steps} (>= 0)")
    return args, step3_flags


def cache_root(args: argparse.Namespace) -> Path:
    if args.cache_dir:
        return Path(args.cache_dir).expanduser()
    from engine.runtime.atomic import cache_root

    return cache_root() / "bench_models"


def build_models(args: argparse.Namespace, dist: Any, dtype: str) -> dict[str, tuple[Path, Any]]:
    """{role: (folder, config)}: the random-weight folders, written by local rank 0 while the others wait."""
    import time

    from engine.bench.random_models import ensure_random_model, load_shape, random_model_dir
    from engine.runtime.distributed import barrier

    scale = {k: getattr(args, k) for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads")}
    shapes = {"actor": args.actor_model}
    if not args.no_reward_model:  # the critic's folder: the critic and / or the reward model
        shapes["critic"] = args.critic_model or args.actor_model
    device = "cuda" if dist.device.type == "cuda" else "cpu"
    configs = {role: load_shape(name, **scale) for role, name in shapes.items()}
    if "critic" in configs and getattr(configs["critic"], "vocab_size", 0) < getattr(configs["actor"], "vocab_size", 0):
        raise UserError(f"the critic's vocabulary ({configs['critic'].vocab_size}) is smaller than the actor's "
                        f"({configs['actor'].vocab_size}): it would be given token ids it has no embedding for; "
                        "choose a --critic_model with at least the actor's vocabulary")
    out = {}
    for role, config in configs.items():
        if dist.local_rank == 0:
            start, cached = time.perf_counter(), random_model_dir(config, role, dtype, args.seed, cache_root(args))
            reused = (cached / "config.json").is_file()
            folder = ensure_random_model(config, role, dtype, args.seed, cache_root(args), device)
            logger.info("%s model: %s (%s)", role, folder,
                        "reused" if reused else f"written in {time.perf_counter() - start:.1f} s")
        barrier()
        out[role] = (ensure_random_model(config, role, dtype, args.seed, cache_root(args), device), config)
    return out


class Probe:
    """Attached to step 3's built run (`step3_rlhf.main.build`) before its PPO loop: starts counting the
    roles' model states, and asks the planner for its prediction."""

    def __init__(self) -> None:
        self.run: Any = None
        self.tracker: Any = None
        self.planner: dict[str, Any] | None = None
        self.planner_note: str | None = None
        self.first_step_at: float | None = None  # wall clock when this rank logged PPO step 1

    def __call__(self, run: Any) -> None:
        from engine.bench.role_memory import RoleMemoryTracker

        self.run = run
        roles = run.roles
        self.tracker = RoleMemoryTracker(roles.by_name())
        self.tracker.watch_steps(max_steps=2)
        self.planner, self.planner_note = planner_prediction(run.cfg, run.dist.world_size)
        log = run.metrics.log  # every rank calls it (only rank 0 writes): each rank's first-step time

        def timed_log(step: int, row: Any) -> None:
            if self.first_step_at is None and step >= 1 and any(k.startswith("timing/") for k in row):
                self.first_step_at = time.time()
            log(step, row)

        run.metrics.log = timed_log


def launch_time() -> float:
    """When this run was launched: $RLHF_BENCH_LAUNCH_TIME (epoch seconds, set by a driver before the
    launcher, as benchmarks/lora_speed.sh does), else this process's start (launcher time left out)."""
    if os.environ.get(LAUNCH_ENV):
        return float(os.environ[LAUNCH_ENV])
    import psutil

    return psutil.Process().create_time()


def startup_figures(probe: Probe, device: Any) -> dict[str, Any]:
    """Per rank (a list indexed by rank): launch to the end of PPO step 1, and the peak RSS of the process."""
    import resource

    from engine.runtime.distributed import all_reduce_sum

    world, rank = probe.run.dist.world_size, probe.run.dist.rank
    slots = [0.0] * (2 * world)  # [launch-to-first-step per rank..., peak RSS GB per rank...]
    slots[rank] = (probe.first_step_at or float("nan")) - launch_time()
    slots[world + rank] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux
    values = all_reduce_sum(slots, device)
    return {"launch_to_first_step_s": values[:world], "launch_to_first_step_s_max": max(values[:world]),
            "peak_rss_gb": values[world:], "peak_rss_gb_max": max(values[world:]),
            "launch_from": LAUNCH_ENV if os.environ.get(LAUNCH_ENV) else "process start"}


def planner_prediction(cfg: Any, world_size: int) -> tuple[dict[str, Any] | None, str | None]:
    """(prediction, None), or (None, why there is none): the planner is optional to the benchmark."""
    try:
        from engine.planner.step3 import predict_for_step3
    except ImportError as err:
        return None, f"engine.planner.step3.predict_for_step3 is not importable ({err})"
    try:
        return predict_for_step3(cfg, world_size), None
    except Exception as err:  # noqa: BLE001 - a planner bug must not lose the measurement
        return None, f"predict_for_step3 failed: {type(err).__name__}: {err}"


def step3_argv(args: argparse.Namespace, folders: dict[str, tuple[Path, Any]], dtype: str,
               step3_flags: list[str]) -> list[str]:
    critic = [] if args.no_reward_model else ["--critic_model_name_or_path", str(folders["critic"][0])]
    return ["--actor_model_name_or_path", str(folders["actor"][0]), *critic, "--output_dir", args.run_dir,
            "--max_prompt_seq_len", str(args.max_prompt_seq_len), "--max_answer_seq_len", str(args.max_answer_seq_len),
            "--per_device_generation_batch_size", str(args.per_device_generation_batch_size),
            "--per_device_training_batch_size", str(args.per_device_training_batch_size),
            "--test_stop_step", str(args.steps), "--dtype", dtype, "--seed", str(args.seed), "--disable_tqdm",
            *step3_flags]


def device_name(device: Any) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    try:
        with open("/proc/cpuinfo") as f:
            model = next((line.split(":", 1)[1].strip() for line in f if line.startswith("model name")), None)
    except OSError:
        model = None
    return f"CPU: {model or platform.processor() or 'unknown'} ({os.cpu_count()} cores)"


def model_facts(name: str, config: Any, engine: Any) -> dict[str, Any]:
    """Shape, parameter count and bytes of a built role (ZeRO-3 parameters counted whole, via ds_numel)."""
    from engine.bench.random_models import HEAD_KEYS, HIDDEN_KEYS, INTERMEDIATE_KEYS, LAYER_KEYS, config_value

    data = config.to_dict()
    params = list(engine.module.parameters())
    from engine.runtime.ds_private import full_numel as numel
    heads = config_value(data, HEAD_KEYS)
    return {"name": name, "model_type": config.model_type, "num_layers": config_value(data, LAYER_KEYS),
            "hidden_size": config_value(data, HIDDEN_KEYS), "intermediate_size": config_value(data, INTERMEDIATE_KEYS),
            "num_heads": heads, "num_kv_heads": data.get("num_key_value_heads") or heads,
            "vocab_size": data.get("vocab_size"), "params": sum(numel(p) for p in params),
            # bytes of the whole model as stored (a decode step reads them all once; 4-bit weights count packed)
            "param_bytes": sum(numel(p) * p.element_size() for p in params),
            "trainable_params": sum(numel(p) for p in params if p.requires_grad)}


def run_config(args: argparse.Namespace, probe: Probe, folders: dict[str, tuple[Path, Any]],
               step3_flags: list[str]) -> dict[str, Any]:
    import deepspeed
    import torch
    import transformers

    cfg, dist, roles = probe.run.cfg, probe.run.dist, probe.run.roles
    # The critic and the reward model share the critic's folder; each is described when built.
    built = {role: (model_facts(args.critic_model or args.actor_model, folders["critic"][1], engine)
                    | {"folder": str(folders["critic"][0])})
             for role, engine in (("critic", roles.critic), ("reward", roles.reward)) if engine is not None}
    return {
        "actor": model_facts(args.actor_model, folders["actor"][1], roles.actor) | {"folder": str(folders["actor"][0])},
        **built,
        "roles": list(roles.by_name()),
        "advantage_estimator": cfg.rl.advantage_estimator, "n_samples_per_prompt": cfg.rl.n_samples_per_prompt,
        "reward_funcs": list(cfg.rl.reward_funcs),
        "scale_overrides": {k: getattr(args, k) for k in ("num_layers", "hidden_size", "intermediate_size", "num_heads")
                            if getattr(args, k) is not None},
        "world_size": dist.world_size, "device": dist.device.type, "device_name": device_name(dist.device),
        "dtype": cfg.ds.dtype, "max_prompt_seq_len": cfg.data.max_prompt_seq_len,
        "max_answer_seq_len": cfg.data.max_answer_seq_len,
        "per_device_generation_batch_size": cfg.train.per_device_generation_batch_size,
        "per_device_training_batch_size": cfg.train.per_device_training_batch_size,
        "generation_batches": cfg.train.generation_batches, "ppo_epochs": cfg.train.ppo_epochs,
        "actor_zero_stage": cfg.ds.actor_zero_stage, "critic_zero_stage": cfg.ds.critic_zero_stage,
        "offload": cfg.ds.offload, "enable_hybrid_engine": cfg.ds.enable_hybrid_engine,
        "actor_lora_dim": cfg.lora.actor_lora_dim, "critic_lora_dim": cfg.lora.critic_lora_dim,
        "only_optimize_lora": cfg.lora.only_optimize_lora, "no_lora_arithmetic": args.no_lora_arithmetic,
        "step3_flags": list(step3_flags),
        "versions": {"torch": torch.__version__, "deepspeed": deepspeed.__version__,
                     "transformers": transformers.__version__},
    }


def make_report(args: argparse.Namespace, probe: Probe, folders: dict[str, tuple[Path, Any]], step3_flags: list[str],
                role_bytes: dict[str, Any], startup: dict[str, Any]) -> dict[str, Any]:
    """The report of a finished run (rank 0), from step 3's metrics.jsonl and the probe."""
    config = run_config(args, probe, folders, step3_flags)
    rows = read_metrics(Path(args.run_dir) / "metrics.jsonl")
    all_steps = figures.measured_steps(rows, 0)
    steps = figures.measured_steps(rows, args.warmup_steps)
    if not steps:
        raise UserError(f"step 3 logged {len(all_steps)} PPO steps, none after --warmup_steps {args.warmup_steps}; "
                        "raise --steps")
    baseline = next((r["memory/baseline_gb"] for r in rows if "memory/baseline_gb" in r), None)
    on_cpu = config["device"] == "cpu"
    peak = args.peak_tflops if args.peak_tflops is not None else figures.default_peak_tflops(config["device_name"],
                                                                                          config["dtype"])
    hbm = args.hbm_gb_s if args.hbm_gb_s is not None else figures.default_hbm_gb_s(config["device_name"])
    roles = figures.role_gb(role_bytes)
    memory = figures.memory_peaks(all_steps, baseline, on_cpu) | {"roles": roles,
                                                                  "model_states_gb": figures.model_states_gb(roles)}
    # Rollout rows the updates train on per PPO step, all ranks: prompts x answers per prompt.
    trained = (config["per_device_generation_batch_size"] * config["n_samples_per_prompt"]
               * config["generation_batches"] * config["world_size"])
    report = {
        "config": config,
        "steps": {"run": len(all_steps), "warmup": args.warmup_steps, "measured": len(steps)},
        "throughput": figures.throughput(steps, seq_length=config["max_prompt_seq_len"] + config["max_answer_seq_len"],
                                       ppo_epochs=config["ppo_epochs"], peak_tflops=peak,
                                       trained_samples_per_step=trained),
        "time": figures.phase_times(steps),
        "decode": figures.decode(steps, config["actor"]["param_bytes"], hbm),
        "startup": startup | {"first_step_s": figures.step_seconds(all_steps[0])},
        "memory": memory,
        "planner": probe.planner,
        "planner_note": probe.planner_note,
        "planner_error": None,
        "per_step": [{k: v for k, v in r.items() if k.split("/")[0] in ("step", "timing", "memory", "perf", "rollout")}
                     for r in all_steps],
    }
    if probe.planner is not None:
        measured = memory["growth_gb"] if on_cpu else memory["peak_gb"]
        report["planner_error"] = figures.planner_errors(probe.planner, measured, memory["roles"], on_cpu)
    return report


def drop_lora_arithmetic() -> None:
    """--no_lora_arithmetic: one-module LoRA layers compute `base(x) + 0 * (sum A + sum B)` in this process."""
    import torch.nn.functional as F
    from peft.tuners.lora.layer import Linear

    from engine.models import lora

    def base_only(self: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
        name, base = self.active_adapters[0], self.base_layer
        zero = (self.lora_A[name].weight.sum() + self.lora_B[name].weight.sum()) * 0
        return F.linear(x, base.weight, base.bias) + zero

    lora._lean_class(Linear).forward = base_only


def run_benchmark(args: argparse.Namespace, step3_flags: list[str]) -> dict[str, Any] | None:
    """Build the models, run step 3 in this process, and return the report (None on ranks other than 0)."""
    from engine.config import Step3Config
    from engine.flags import parse_config
    from engine.preflight import default_dtype
    from engine.runtime.distributed import init_distributed, setup_logging
    from step3_rlhf import main as step3

    dist = init_distributed(args.seed)
    setup_logging(dist.is_main)
    dtype = args.dtype or default_dtype()
    folders = build_models(args, dist, dtype)
    if args.no_lora_arithmetic:
        drop_lora_arithmetic()
    probe = Probe()
    run = step3.build(parse_config(Step3Config, step3_argv(args, folders, dtype, step3_flags)))
    probe(run)
    step3.run_ppo(run, measure_only=True)
    role_bytes = probe.tracker.finish()
    startup = startup_figures(probe, dist.device)
    if not dist.is_main:
        return None
    return make_report(args, probe, folders, step3_flags, role_bytes, startup)


def write_report(report: dict[str, Any], args: argparse.Namespace) -> None:
    text = figures.markdown_report(report)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(report, indent=2) + "\n")
    md = args.markdown or (str(Path(args.out).with_suffix(".md")) if args.out else None)
    if md:
        Path(md).parent.mkdir(parents=True, exist_ok=True)
        Path(md).write_text(text)
    print(json.dumps(report), flush=True)


def compare(paths: Sequence[str], as_json: bool = False) -> str:
    reports = []
    for path in paths:
        try:
            reports.append(json.loads(Path(path).read_text()))
        except (OSError, ValueError) as err:
            raise UserError(f"--compare {path}: cannot read a benchmark report ({err}); give JSON files written "
                            "with --out") from None
        if "throughput" not in reports[-1] or "config" not in reports[-1]:
            raise UserError(f"--compare {path}: not a benchmark report (no throughput/config); give files written "
                            "with --out")
    if len(reports) < 2:
        raise UserError("--compare needs at least two reports")
    names = [Path(p).stem for p in paths]
    if as_json:
        return json.dumps(figures.compare_json(reports, names), indent=2) + "\n"
    return figures.compare_markdown(reports, names)


def main(argv: Sequence[str] | None = None) -> None:
    args, step3_flags = parse_args(sys.argv[1:] if argv is None else argv)
    if args.compare:
        print(compare(args.compare, args.json), end="", flush=True)
        return
    from engine.runtime.distributed import gpu_wanted

    if not gpu_wanted() and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        logging.getLogger("engine").warning(
            "CPU run without MALLOC_MMAP_THRESHOLD_=65536: glibc keeps freed tensors below its adaptive mmap "
            "threshold in the RSS, so the phase peaks overstate live memory; set it for memory figures")
    report = run_benchmark(args, step3_flags)
    if report is not None:
        write_report(report, args)


if __name__ == "__main__":
    run_main(main)
