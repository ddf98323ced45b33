"""Every DeepSpeed-Chat script shape under step*/training_scripts/, run as a new user would try it on a CPU machine:
each flag set the script (or sweep) launches, with small random-weight models of the script's family swapped in
for the hub ones, the bundled task for the hub data, short sequences, small micro-batches and a stop after two
steps (step 3 without its evaluation, which DeepSpeed-Chat's does not have), launched on 2 CPU ranks. Everything
else the script passes (ZeRO stage, offload, LoRA, gradient checkpointing, accumulation, hybrid engine, MixZ++,
tensor-parallel flags, test mode, ...) is kept.

    python -m tests.helpers.dschat_script_trial --out output/script_trial [--only opt/single_node]

Prints one line per flag set and writes `<out>/trial.json` (exit status, seconds, the end of the log of each);
exits 1 if any set failed. It takes a few minutes per dozen sets, so no test tier runs it; test_launch_scripts.py
parses every set instead.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from tests.helpers.launch_scripts import launched_flag_sets, parse_flags

ROOT = Path(__file__).resolve().parents[2]
# Our own scripts, not DeepSpeed-Chat's: the tiny demos and the planner's Llama-2 recipes.
OURS = re.compile(r"/tiny/|_\d+x\d+gb\.sh$")
SHRINK = {"max_seq_len": 64, "max_prompt_seq_len": 16, "max_answer_seq_len": 16, "num_train_epochs": 1}
SIZES = {"step3_rlhf": ("max_prompt_seq_len", "max_answer_seq_len", "per_device_generation_batch_size",
                        "per_device_training_batch_size")}
SIZES.update(dict.fromkeys(("step1_sft", "step2_reward", "step2_dpo"),
                           ("max_seq_len", "per_device_train_batch_size", "per_device_eval_batch_size")))
SMALL_BATCH = {name for names in SIZES.values() for name in names if name.startswith("per_device_")}


def family(script: Path) -> str:
    """The planner shape standing in for the script's hub model, scaled down."""
    return "llama-2-7b" if "llama2" in script.parts else "opt-1.3b" if "opt" in script.parts else "tiny"


def small_models(shape: str, cache: Path) -> dict[str, Path]:
    from engine.bench.random_models import ensure_random_model, load_shape

    config = load_shape(shape, num_layers=2, hidden_size=64, intermediate_size=128, num_heads=4)
    return {role: ensure_random_model(config, role, "fp32", 1234, cache) for role in ("actor", "critic")}


def trial_flags(words: list[str], models: dict[str, Path], output: Path, step: str) -> list[str]:
    """The script's flags with the swaps described above."""
    out: list[str] = []
    for name, values in parse_flags(words):
        if name in ("data_path", "local_rank", "output_dir"):
            continue
        if name in ("model_name_or_path", "actor_model_name_or_path"):
            values = [str(models["actor"])]
        elif name == "critic_model_name_or_path":
            values = [str(models["critic"])]
        elif name in SHRINK:
            values = [str(SHRINK[name])]
        elif name in SMALL_BATCH:
            values = [str(min(int(values[0]), 2))]
        out += [f"--{name}", *values]
    if step != "step3_rlhf" and "--model_name_or_path" not in out:  # a script with the model's default
        out += ["--model_name_or_path", str(models["actor"])]
    for name in SIZES[step]:  # a script that leaves a size at its default (256-token answers, 16 per batch)
        if f"--{name}" not in out:
            out += [f"--{name}", str(SHRINK.get(name, 2))]
    if "--test_stop_step" not in out:
        out += ["--test_stop_step", "2"]
    if step == "step3_rlhf":  # DeepSpeed-Chat's step 3 never evaluates; ours would, before and after
        out += ["--eval_prompts", "0"]
    return [*out, "--output_dir", str(output)]


def run_set(main_py: str, flags: list[str], work: Path, port: int) -> tuple[int, float, str]:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1")
    start = time.time()
    proc = subprocess.run(["deepspeed", "--num_gpus", "2", "--master_port", str(port), main_py, *flags], cwd=work,
                          env=env, capture_output=True, text=True, timeout=900)
    return proc.returncode, time.time() - start, (proc.stdout + proc.stderr)[-2500:]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="output/script_trial")
    p.add_argument("--only", default="", help="Only scripts whose path contains this.")
    args = p.parse_args()
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    from engine.runtime.distributed import free_port

    scripts = [s for s in sorted(ROOT.glob("step*/training_scripts/**/*.sh"))
               if not OURS.search(str(s)) and args.only in str(s.relative_to(ROOT))]
    results, cache = [], out / "models"
    for script in scripts:
        rel = script.relative_to(ROOT)
        step = rel.parts[0]
        models = small_models(family(script), cache)
        with tempfile.TemporaryDirectory() as record:
            sets = launched_flag_sets(script, Path(record))
        for n, words in enumerate(sets):
            name = f"{str(rel)[:-3].replace('/', '.')}.{n}"
            flags = trial_flags(words[1:], models, out / "runs" / name, step)
            work = out / "work" / name
            work.mkdir(parents=True, exist_ok=True)
            rc, seconds, tail = run_set(str(ROOT / step / "main.py"), flags, work, free_port())
            results.append({"script": str(rel), "set": n, "rc": rc, "seconds": round(seconds, 1),
                            "flags": flags, "log_tail": tail})
            print(f"{'ok  ' if rc == 0 else 'FAIL'} {seconds:6.1f}s {rel} [{n}]", flush=True)
            (out / "trial.json").write_text(json.dumps(results, indent=1))
    failed = [r for r in results if r["rc"] != 0]
    names = ", ".join(f"{r['script']} [{r['set']}]" for r in failed)
    print(f"{len(results) - len(failed)} of {len(results)} flag sets ran; failed: {names or 'none'}")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
