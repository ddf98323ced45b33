"""The whole pipeline in one command: step 1 (SFT) -> step 2 (reward model) -> step 3 (PPO RLHF) ->
evaluation of the actors -> a report, each step through its launch script (as DeepSpeed-Chat's
e2e_rlhf.py).

    python e2e_rlhf.py                        # the demo: built-in tiny model, bundled sorting task
    python e2e_rlhf.py --step 2 3             # start again from step 2 (step 1's model stays)
    python e2e_rlhf.py --algorithm grpo       # step 1 -> GRPO with the task's rule as the reward (no step 2)
    python e2e_rlhf.py --algorithm dpo        # step 1 -> step 2 (DPO) on the task's pairs, in place of steps 2 + 3
    python e2e_rlhf.py --actor-model 1.3b --reward-model 350m --deployment-type single_node
    python e2e_rlhf.py --actor-model 6.7b --deployment-type single_gpu    # DeepSpeed-Chat's sizes and deployments

With no arguments it runs the demo on what the machine has: one GPU when there is one, else two CPU
ranks (DeepSpeed on gloo), and writes everything to ./output:

    output/step1_sft/ step2_reward/ step3_rlhf/   each step's models, metrics.jsonl, curves.png, training.log
    output/step3_grpo/                            step 3 of --algorithm grpo (step3_<algorithm>; PPO's stays)
    output/step2_dpo/                             step 2 of --algorithm dpo: the DPO actor itself, its metrics
    output/eval/                                  eval_report.json, eval_report.md, samples.md
    output/report/                                README.md (the verdict), curves of all steps, the table
    output/logs/                                  the console output of every stage

Each step's output folder is passed to the next. The first stage that fails stops the pipeline with
the end of its log and the command that starts again from it. --stepN-args passes extra flags to a
step's main.py (e.g. --step3-args="--ppo_epochs 2 --enable_tensorboard"; write the `=`, so that a
single flag is not taken for one of e2e_rlhf.py's own), --eval-args to step3_rlhf/evaluate.py.

--algorithm picks step 3's algorithm: ppo (DeepSpeed-Chat's: a critic and the step-2 reward model), or a
critic-free estimator (grpo, dr_grpo, rloo, reinforce_pp, reinforce_pp_baseline, remax) that is rewarded by
the bundled task's rule (engine.rewards.builtin:sort_rule), so the pipeline is steps 1 and 3. The evaluation
then compares SFT, the new actor and, when an earlier run left it, the PPO actor (and scores with the step-2
reward model when there is one).

--algorithm dpo replaces steps 2 and 3 with step 2 (DPO, step2_dpo/main.py): the step-1 model is trained directly
on the bundled task's preference pairs (those the reward model learns from) against a frozen copy of itself, with
no reward model, no generation and no critic, so the pipeline is steps 1 and 2 (--step 1 2; --step 2 starts again
from an earlier step 1). The evaluation compares SFT, the DPO actor and every actor an earlier run left in the
output folder (PPO's, GRPO's, ...), scored by the step-2 reward model when one is there.
"""
from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from engine.errors import UserError
from engine.eval.report import DPO_FOLDER, actor_path, build_report, step3_folder, trained_folder
from engine.helptext import HelpFormatter
from engine.rl.advantages import ESTIMATOR_NAMES
from engine.runtime.entry import run_main

ROOT = Path(__file__).resolve().parent
STEP_DIRS = {1: "step1_sft", 2: "step2_reward", 3: "step3_rlhf"}
STEP_NAMES = {1: "step 1 (SFT)", 2: "step 2 (reward model)", 3: "step 3 (PPO RLHF)"}
DPO = "dpo"  # the --algorithm whose step 2 (step2_dpo/main.py) replaces steps 2 + 3
# --actor-model and --reward-model choices: the model family whose launch scripts run them.
# DeepSpeed-Chat's sizes (1.3b, 6.7b, 13b, 66b) plus its 30b LoRA scripts.
ACTOR_MODELS = {"tiny": "tiny", "1.3b": "opt", "6.7b": "opt", "13b": "opt", "30b": "opt", "66b": "opt",
                "llama2-7b": "llama2", "llama2-7b-lora": "llama2"}
REWARD_MODELS = {"tiny": "tiny", "350m": "opt", "llama2-7b": "llama2", "llama2-7b-lora": "llama2"}
DEFAULT_REWARD = {"tiny": "tiny", "opt": "350m"}
DEPLOYMENTS = ("single_gpu", "single_node", "multi_node", "cpu")
# --algorithm: PPO with a critic (steps 2 + 3), DPO (step 2 alone), or a critic-free estimator for step 3
# (engine.rl.advantages).
ALGORITHMS = ("ppo", DPO, *(name for name in ESTIMATOR_NAMES if name != "gae"))
TAIL_LINES = 40
TAIL_BYTES = 1 << 18  # kept of a stage's output to find those lines in (progress bars make long lines)


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--step", type=int, nargs="+", choices=(1, 2, 3), default=None,
                   help="Which steps to run (default: all three; 1 and 3 for a critic-free --algorithm; 1 and 2 for "
                   "dpo); the others' outputs must already exist.")
    p.add_argument("--algorithm", default="ppo", choices=ALGORITHMS,
                   help="ppo: step 2 trains a reward model, step 3 PPO with a critic (DeepSpeed-Chat's pipeline); dpo: "
                   "step 2 trains the actor on the preference pairs directly (step2_dpo/main.py, no step 3); or a "
                   "critic-free estimator for step 3, rewarded by the bundled task's rule (no step 2). Default: ppo.")
    p.add_argument("--actor-model", "--actor_model", default="tiny", choices=sorted(ACTOR_MODELS),
                   help="tiny: the built-in model on the bundled task; 1.3b/6.7b/13b/30b/66b: OPT, through "
                   "training_scripts/opt/<deployment>/run_<size>.sh (run_<size>_lora.sh where only that exists, "
                   "e.g. 6.7b on single_gpu, 30b on single_node), as DeepSpeed-Chat; llama2-7b[-lora].")
    p.add_argument("--reward-model", "--reward_model", default=None, choices=sorted(REWARD_MODELS),
                   help="Default: tiny for tiny, 350m for OPT actors, the actor's own for Llama-2.")
    p.add_argument("--actor-zero-stage", "--actor_zero_stage", default="", choices=("", "0", "1", "2", "3"),
                   help="ZeRO stage of steps 1 and 3's actor (default: the launch script's).")
    p.add_argument("--reward-zero-stage", "--reward_zero_stage", default="", choices=("", "0", "1", "2", "3"),
                   help="ZeRO stage of step 2 and of step 3's critic (default: the launch script's).")
    p.add_argument("--deployment-type", "--deployment_type", default=None, choices=DEPLOYMENTS,
                   help="single_gpu, single_node (every GPU of this machine), multi_node (HOSTFILE), or cpu "
                   "(CPU ranks on gloo; tiny model only). Default: single_gpu with a GPU, else cpu.")
    p.add_argument("--cpu-ranks", "--cpu_ranks", type=int, default=2, help="Ranks of the cpu deployment.")
    p.add_argument("--output-dir", "--output_dir", default="./output", help="Where everything goes.")
    p.add_argument("--verbose", action="store_true",
                   help="Also show the DeepSpeed launcher's INFO lines and DeepSpeed's own (output/logs/ has the "
                   "launcher's either way); sets RLHF_ENGINE_VERBOSE=1 for the steps (setting it does the same).")
    for n in (1, 2, 3):
        also = f" ({DPO_FOLDER}/main.py with --algorithm dpo)" if n == 2 else ""
        p.add_argument(f"--step{n}-args", f"--step{n}_args", default="", metavar="FLAGS",
                       help=f"Extra flags for {STEP_DIRS[n]}/main.py{also}, as one string: "
                       f"--step{n}-args=\"--flag value\".")
    p.add_argument("--eval-args", "--eval_args", default="", metavar="FLAGS",
                   help="Extra flags for step3_rlhf/evaluate.py, as one string: --eval-args=\"--flag value\".")
    args = p.parse_args(argv)
    args.step = sorted(set(args.step or pipeline_steps(args.algorithm)))
    if args.algorithm == DPO and 3 in args.step:
        raise UserError("--algorithm dpo trains the actor in step 2 (DPO), in place of the reward model and step 3: "
                        "drop 3 from --step (e.g. --step 1 2), or use --algorithm ppo or a critic-free one for step 3")
    if args.algorithm not in ("ppo", DPO) and 2 in args.step:
        raise UserError(f"--algorithm {args.algorithm} is rewarded by the task's rule and trains no reward model: "
                        f"drop 2 from --step (e.g. --step 1 3), or use --algorithm ppo")
    args.argv = list(sys.argv[1:] if argv is None else argv)
    if args.cpu_ranks < 1:
        raise UserError("--cpu-ranks must be >= 1")
    return args


@dataclass
class Stage:
    """One command of the pipeline and where its console output goes."""

    name: str                  # e.g. "step 2 (reward model)"
    command: list[str] | Callable[[], list[str]]  # a callable builds it when the stage starts
    log: Path
    env: dict[str, str] = field(default_factory=dict)
    step: int | None = None    # the pipeline step, for the restart hint (None: evaluation)


def main(argv: Sequence[str] | None = None) -> None:
    args = parse_args(argv)
    out = Path(args.output_dir).expanduser().resolve()
    if out.exists() and not out.is_dir():
        raise UserError(f"--output_dir {out} is a file; give a folder path")
    family = ACTOR_MODELS[args.actor_model]
    reward = args.reward_model or DEFAULT_REWARD.get(family, args.actor_model)
    deployment = args.deployment_type or default_deployment()
    check_choices(args.actor_model, reward, family, deployment, args.algorithm)
    if deployment == "multi_node":  # every node named must resolve before anything starts on any of them
        from engine.runtime.network import read_hostfile

        read_hostfile(Path(os.environ.get("HOSTFILE", "/job/hostfile")))
    if shutil.which("deepspeed") is None:
        raise UserError("the deepspeed launcher is not on PATH; install the project (pip install -e .)")
    stages = plan(args, out, family, reward, deployment)
    check_inputs(args.step, out, args.algorithm)

    out.mkdir(parents=True, exist_ok=True)
    # A report (or evaluation) from an earlier run would describe models this run replaces.
    for stale in ["report"] + (["eval"] if trained_step(args.algorithm) in args.step else []):
        shutil.rmtree(out / stale, ignore_errors=True)
    timings: dict[str, float] = {}
    for stage in stages:
        timings[stage.name] = run_stage(stage, args, out)
    report = build_report(out, {"command": shlex.join(["python", "e2e_rlhf.py", *args.argv]),
                                "deployment": deployment, "actor_model": args.actor_model,
                                "reward_model": reward if args.algorithm == "ppo" else None,
                                "algorithm": args.algorithm, "candidate": candidate_name(args.algorithm),
                                "seconds": timings})
    print(f"\npipeline finished in {sum(timings.values()):.0f} s; report: {report / 'README.md'}", flush=True)
    verdict = (report / "verdict.txt")
    if verdict.is_file():
        print(verdict.read_text(), flush=True)


def default_deployment() -> str:
    from engine.runtime.distributed import gpu_wanted

    return "single_gpu" if gpu_wanted() else "cpu"


def candidate_name(algorithm: str) -> str:
    """The trained actor's name in the evaluation: rlhf for PPO (as the demo always called it), else the algorithm."""
    return "rlhf" if algorithm == "ppo" else algorithm


def pipeline_steps(algorithm: str) -> list[int]:
    """The steps of the whole pipeline: PPO's three, DPO's step 2 in place of 2 + 3, a critic-free step 3 alone."""
    return {"ppo": [1, 2, 3], DPO: [1, 2]}.get(algorithm, [1, 3])


def trained_step(algorithm: str) -> int:
    """The step that trains the actor the evaluation compares with SFT."""
    return pipeline_steps(algorithm)[-1]


def step_name(step: int, algorithm: str) -> str:
    if algorithm == "ppo" or step != trained_step(algorithm):
        return STEP_NAMES[step]
    return f"step {step} ({algorithm.upper()})"


def step_output(step: int, algorithm: str) -> str:
    """The output folder of `step` in this algorithm's pipeline (step3_grpo for GRPO's step 3, step2_dpo for DPO)."""
    return trained_folder(algorithm) if step == trained_step(algorithm) else STEP_DIRS[step]


def step_code(step: int, algorithm: str) -> str:
    """The folder of `step`'s main.py and launch scripts: step2_dpo for DPO's step 2, else the step's own."""
    return DPO_FOLDER if algorithm == DPO and step == 2 else STEP_DIRS[step]


def check_choices(actor: str, reward: str, family: str, deployment: str, algorithm: str = "ppo") -> None:
    """Refuse model/deployment combinations no launch script covers, before anything runs."""
    if algorithm == DPO and family != "tiny":
        raise UserError(f"--algorithm dpo runs the demo's bundled task; for --actor-model {actor} run step 1, then "
                        f"{DPO_FOLDER}/main.py with --model_name_or_path <step-1 folder> and your pairs' --data_path "
                        "(docs/step2_dpo.md), or drop --actor-model for the tiny demo")
    if algorithm not in ("ppo", DPO) and family != "tiny":
        raise UserError(f"--algorithm {algorithm} runs the demo's bundled task (its rule is the reward); for "
                        "Llama-2-7B GRPO on GSM8K use step3_rlhf/training_scripts/llama2/run_llama2_7b_grpo_*.sh, "
                        "or drop --actor-model for the tiny demo")
    if REWARD_MODELS[reward] != family:
        raise UserError(f"--reward-model {reward} is not of the actor's family ({family}); step 3 needs actor and "
                        f"critic to share a tokenizer: use --reward-model {DEFAULT_REWARD.get(family, actor)}")
    if family == "llama2" and reward != actor:
        raise UserError(f"--actor-model {actor} goes with --reward-model {actor} (the same recipe for both)")
    if family == "tiny" and deployment == "multi_node":
        raise UserError("the tiny demo runs on one machine; use --deployment-type cpu, single_gpu or single_node")
    if family != "tiny" and deployment == "cpu":
        raise UserError(f"--actor-model {actor} needs GPUs; on a CPU use the tiny demo (no --actor-model)")
    if family == "llama2" and deployment != "single_node":
        raise UserError("the Llama-2 scripts run on one node of 8 GPUs; use --deployment-type single_node")


def script_for(step: int, family: str, model: str, deployment: str, algorithm: str = "ppo") -> Path:
    """The launch script of `step` for a model and deployment; a clear error when there is none."""
    folder = ROOT / step_code(step, algorithm) / "training_scripts"
    if family == "tiny":
        critic_free = step == 3 and algorithm not in ("ppo", DPO)
        path = folder / "tiny" / ("run_demo_critic_free.sh" if critic_free else "run_demo.sh")
    elif family == "llama2":
        path = folder / "llama2" / f"run_{model.replace('-', '_')}.sh"
    else:
        path = folder / "opt" / deployment / f"run_{model}.sh"
        lora = path.with_name(f"run_{model}_lora.sh")  # DeepSpeed-Chat ships some sizes only as LoRA scripts
        path = lora if not path.is_file() and lora.is_file() else path
    if not path.is_file():
        have = sorted(p.stem.removeprefix("run_") for p in path.parent.glob("run_*.sh"))
        raise UserError(f"no launch script for {step_name(step, algorithm)} with model {model} on {deployment} "
                        f"({path.relative_to(ROOT)}); that deployment has: {', '.join(have) or 'none'}")
    return path


def plan(args: argparse.Namespace, out: Path, family: str, reward: str, deployment: str) -> list[Stage]:
    """The stages to run: the chosen steps' launch scripts, then (after step 3) the evaluation."""
    from engine.runtime.distributed import VERBOSE_ENV, verbose_wanted

    env = stage_env(deployment, args.cpu_ranks) | ({VERBOSE_ENV: "1"} if verbose_wanted(args.verbose) else {})
    ranks = {"cpu": str(args.cpu_ranks), "single_gpu": "1", "single_node": ""}.get(deployment, "")
    sft, rm, rlhf = out / STEP_DIRS[1], out / STEP_DIRS[2], out / step3_folder(args.algorithm)
    dpo = args.algorithm == DPO  # step 2 trains the actor: the actor's ZeRO stage
    positional = {1: [sft, args.actor_zero_stage],
                  2: [out / DPO_FOLDER, args.actor_zero_stage] if dpo else [rm, args.reward_zero_stage],
                  3: ([sft, rm, args.actor_zero_stage, args.reward_zero_stage, rlhf] if args.algorithm == "ppo"
                      else [sft, args.algorithm, args.actor_zero_stage, rlhf])}
    if family == "tiny":  # the demo scripts also take step 2's starting model (reward model or DPO) and the ranks
        positional[2].append(sft)
        for n in positional:
            positional[n].append(ranks)
    stages = []
    for n in args.step:
        script = script_for(n, family, reward if n == 2 else args.actor_model, deployment, args.algorithm)
        extra = split_flags(getattr(args, f"step{n}_args"), f"--step{n}-args")
        log = out / "logs" / f"{step_output(n, args.algorithm)}.log"
        stages.append(Stage(step_name(n, args.algorithm), ["bash", str(script), *map(str, positional[n]), *extra],
                            log, env, n))
    if trained_step(args.algorithm) in args.step:
        extra = split_flags(args.eval_args, "--eval-args")
        stages.append(Stage("evaluation", lambda: evaluation_command(out, extra, args.algorithm),
                            out / "logs" / "evaluate.log", env))
    return stages


def split_flags(text: str, flag: str) -> list[str]:
    try:
        return shlex.split(text)
    except ValueError as err:
        raise UserError(f"{flag}: cannot split {text!r} into flags ({err}); quote it as one string") from None


def stage_env(deployment: str, cpu_ranks: int) -> dict[str, str]:
    """Environment of every stage: a free rendezvous port; CPU-only ranks with a fair share of threads."""
    from engine.runtime.distributed import free_port

    env = {"MASTER_PORT": str(free_port()), "TOKENIZERS_PARALLELISM": "false"}
    if deployment == "cpu":
        env |= {"CUDA_VISIBLE_DEVICES": "", "DS_ACCELERATOR": "cpu"}
        if "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // cpu_ranks))
    return env


def check_inputs(steps: list[int], out: Path, algorithm: str = "ppo") -> None:
    """A step whose input step is not run now needs that step's model folder from an earlier run."""
    needs = {2: [1], 3: [1, 2] if algorithm == "ppo" else [1]}
    for n in steps:
        for m in needs.get(n, []):
            folder = out / STEP_DIRS[m]
            if m not in steps and not (folder / "config.json").is_file():
                rerun = [k for k in pipeline_steps(algorithm) if k >= m]
                raise UserError(f"{step_name(n, algorithm)} needs the model of {STEP_NAMES[m]} in {folder}, which "
                                f"is not there; run from step {m} (--step {' '.join(map(str, rerun))})")


def run_stage(stage: Stage, args: argparse.Namespace, out: Path) -> float:
    """Run a stage, its output streamed to the console and its log; stop the pipeline if it fails."""
    command = stage.command() if callable(stage.command) else stage.command
    print(f"\n=== {stage.name}: {shlex.join(command)}", flush=True)
    stage.log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    tail = bytearray()  # the end of the output, for the error message
    from engine.runtime.distributed import verbose_wanted

    console = LauncherLines(verbose=verbose_wanted(args.verbose), hide_hostfile=args.deployment_type != "multi_node")
    with open(stage.log, "wb") as log:
        proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                env={**os.environ, **stage.env}, start_new_session=True)
        try:
            while chunk := os.read(proc.stdout.fileno(), 1 << 16):
                sys.stdout.buffer.write(console.feed(chunk))
                sys.stdout.buffer.flush()
                log.write(chunk)
                tail += chunk
                del tail[:-TAIL_BYTES]
            sys.stdout.buffer.write(console.flush())
            code = proc.wait()
        except KeyboardInterrupt:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait()
            raise
    seconds = time.perf_counter() - start
    if code != 0:
        lines = last_lines(tail.decode("utf-8", "replace"), TAIL_LINES)
        restart = (restart_command(args.argv, [n for n in args.step if n >= stage.step]) if stage.step is not None
                   else shlex.join(command))
        print(f"\nerror: {stage.name} failed (exit status {code}) after {seconds:.0f} s; the end of its log "
              f"({stage.log}):\n" + "\n".join(f"  | {line}" for line in lines) +
              f"\nfix the problem, then start again from there: {restart}", file=sys.stderr, flush=True)
        sys.exit(code if code > 0 else 1)
    print(f"=== {stage.name} done in {seconds:.0f} s", flush=True)
    return seconds


class LauncherLines:
    """Keeps the DeepSpeed launcher's INFO lines off the console (30 lines of up to 878 characters in the
    demo: the command of every rank, its environment) unless --verbose; the stage's log keeps them. Its
    warnings and errors pass, but for "Unable to find hostfile", expected on one machine. Complete lines
    are filtered; an unfinished one passes at once (a progress bar) unless it may be a launcher line."""

    def __init__(self, verbose: bool, hide_hostfile: bool):
        hidden = [] if verbose else [LAUNCHER_INFO] + ([LAUNCHER_HOSTFILE] if hide_hostfile else [])
        self.hidden = re.compile(rb"|".join(hidden)) if hidden else None
        self.pending = b""

    def feed(self, chunk: bytes) -> bytes:
        if self.hidden is None:
            return chunk
        head, newline, tail = (self.pending + chunk).rpartition(b"\n")
        shown = self.hidden.sub(b"", head + newline)
        start = LAUNCHER_PREFIX.search(tail)  # a launcher line still being written: wait for its end
        cut = start.start() if start else len(tail)
        self.pending = tail[cut:]
        return shown + tail[:cut]

    def flush(self) -> bytes:
        """What is still held when the stage ends (its last line had no newline)."""
        rest, self.pending = self.pending, b""
        if self.hidden is None or not rest:
            return rest
        shown = self.hidden.sub(b"", rest + b"\n")
        return shown[:-1] if shown.endswith(b"\n") else shown


# The launcher's log lines: "[2026-12-07 03:42:45,867] [INFO] [runner.py:618:main] cmd = ...". A line may
# follow a progress bar's last update on the same line (no newline in between): matched anywhere.
LAUNCHER_STAMP = rb"\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\] "
LAUNCHER_INFO = LAUNCHER_STAMP + rb"\[(?:DEBUG|INFO)\] \[(?:runner|launch)\.py:\d+:\w+\][^\n]*\n"
LAUNCHER_HOSTFILE = LAUNCHER_STAMP + rb"\[WARNING\] \[runner\.py:\d+:fetch_hostfile\][^\n]*\n"
# The start of a stamp, possibly cut short by the end of a read.
LAUNCHER_PREFIX = re.compile(rb"\[\d{4}-\d\d-\d\d [^\]\n]*(?:\][^\n]*)?$|\[[\d\-: ,]{0,25}$")


def restart_command(argv: list[str], steps: list[int]) -> str:
    """The user's command with its --step replaced by `steps`."""
    kept, skipping = [], False
    for word in argv:
        if word == "--step" or word.startswith("--step="):
            skipping = word == "--step"
            continue
        if skipping and word.isdigit():
            continue
        skipping = False
        kept.append(word)
    return shlex.join(["python", "e2e_rlhf.py", *kept, "--step", *map(str, steps)])


def last_lines(text: str, n: int) -> list[str]:
    """The last `n` non-empty lines as a terminal shows them: a carriage return (progress bars) rewrites its line."""
    shown = [line.rsplit("\r", 1)[-1].rstrip() for line in text.split("\n")]
    return [line for line in shown if line.strip()][-n:]


def evaluation_command(out: Path, extra: list[str], algorithm: str = "ppo") -> list[str]:
    """step3_rlhf/evaluate.py on SFT vs RLHF (vs EMA) with the data, lengths, seed and sampling step 3 used
    (read from the config.yaml step 3 saved, so it is built once step 3 has run). A critic-free or DPO run's actor
    is named after its algorithm and compared with the other actors an earlier run left (`other_actors`); the
    step-2 reward model scores when it exists. DPO generates nothing in training: its actor is judged with
    evaluate.py's defaults, the demo's step-3 lengths and sampling, as those actors are."""
    trained = out / trained_folder(algorithm)
    saved = trained / "config.yaml"
    if not saved.is_file():
        step = trained_step(algorithm)
        raise UserError(f"{saved} is missing: step {step} did not finish; run --step {step} again")
    cfg = yaml.safe_load(saved.read_text())
    data, ppo, train = cfg.get("data", {}), cfg.get("ppo", {}), cfg.get("train", {})
    name = candidate_name(algorithm)
    models = [f"sft={out / STEP_DIRS[1]}", f"{name}={actor_path(out, algorithm)}"]
    if (trained / "actor_ema" / "config.json").is_file():
        models.append(f"{'ema' if algorithm == 'ppo' else name + '_ema'}={trained / 'actor_ema'}")
    if algorithm != "ppo":
        models += [f"{other}={path}" for other, path in other_actors(out, algorithm).items()]
    reward = out / STEP_DIRS[2]
    command = [sys.executable, str(ROOT / "step3_rlhf" / "evaluate.py"), "--models", *models,
               *(["--reward_model", str(reward)] if algorithm == "ppo" or (reward / "config.json").is_file() else []),
               "--output_dir", str(out / "eval")]
    if algorithm != DPO:
        command += ["--max_prompt_seq_len", str(data.get("max_prompt_seq_len", 256)),
                    "--max_answer_seq_len", str(data.get("max_answer_seq_len", 256))]
    command += ["--seed", str(train.get("seed", 1234))]
    if data.get("data_path"):
        command += ["--data_path", *data["data_path"]]
    if ppo.get("do_sample", True):
        command += ["--temperature", str(ppo.get("temperature", 1.0)), "--top_p", str(ppo.get("top_p", 1.0)),
                    "--top_k", str(ppo.get("top_k", 0))]
    else:
        command.append("--greedy")
    return command + extra


def other_actors(out: Path, algorithm: str) -> dict[str, Path]:
    """{name: folder} of the actors earlier runs left under `out`, besides `algorithm`'s: PPO's (as ppo), each
    critic-free step 3's (grpo, rloo, ...) and DPO's, in that order; a folder without a saved model is left out."""
    found = {"ppo": actor_path(out, "ppo")}
    for folder in sorted(out.glob("step3_*")):
        found.setdefault(folder.name.removeprefix("step3_"), folder / "actor")
    found[DPO] = actor_path(out, DPO)
    found.pop("rlhf", None)  # step3_rlhf is PPO's, named ppo above
    return {name: path for name, path in found.items()
            if name != algorithm and name in ALGORITHMS and (path / "config.json").is_file()}


if __name__ == "__main__":
    run_main(main)
