"""The Llama-2-7B step-3 recipes (PPO and GRPO): their memory flags are the planner's answer for their hardware
and algorithm, the peak in their comment is the planner's, and the flags run (one PPO step on the built-in
model, CPU)."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

import pytest

from engine.config import Step3Config
from engine.flags import parse_config
from engine.planner.__main__ import build_parser, plan
from engine.planner.step3 import knobs_from_step3
from tests.helpers.launch_scripts import main_py_args

pytestmark = pytest.mark.smoke

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "step3_rlhf/training_scripts/llama2").glob("run_llama2_7b_*x*gb.sh"))
PPO_RECIPES = [p for p in RECIPES if "_grpo_" not in p.name]
GRPO_RECIPES = [p for p in RECIPES if "_grpo_" in p.name]


def planner_command(script: Path) -> list[str]:
    line = next(line for line in script.read_text().splitlines() if "python -m engine.planner" in line)
    return shlex.split(line.split("python -m engine.planner", 1)[1])


def memory_flags(script: Path) -> list[str]:
    """The recipe's flags that the planner chose (those `Knobs.flags` writes, plus the sequence lengths)."""
    args = main_py_args(script)
    answer = plan(build_parser().parse_args(planner_command(script)))
    chosen = {w for w in shlex.split(answer["flags"]) if w.startswith("--")}
    out, i = [], 0
    while i < len(args):
        if args[i] in chosen:
            out.append(args[i])
            if i + 1 < len(args) and not args[i + 1].startswith("--"):
                out.append(args[i + 1])
                i += 1
        i += 1
    return out


def test_three_recipes():
    assert [p.name for p in PPO_RECIPES] == ["run_llama2_7b_1x24gb.sh", "run_llama2_7b_1x80gb.sh",
                                             "run_llama2_7b_8x80gb.sh"]


def test_grpo_recipes():
    assert [p.name for p in GRPO_RECIPES] == ["run_llama2_7b_grpo_full_8x80gb.sh", "run_llama2_7b_grpo_lora_1x80gb.sh"]
    for script in GRPO_RECIPES:  # the planner plans the recipe's algorithm
        command = " ".join(planner_command(script))
        assert "--advantage_estimator grpo --n_samples_per_prompt 8" in command
        assert " ".join(main_py_args(script)).count("--advantage_estimator grpo --n_samples_per_prompt 8") == 1


@pytest.mark.parametrize("script", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_is_the_planners_answer(script: Path):
    answer = plan(build_parser().parse_args(planner_command(script)))
    assert answer["fits"]
    recipe = knobs_from_step3(parse_config(Step3Config, main_py_args(script)))
    planned = knobs_from_step3(parse_config(Step3Config, shlex.split(answer["flags"])))
    assert recipe == planned
    peak = float(re.search(r"# planner: peak ([\d.]+) GiB per GPU", script.read_text()).group(1))
    assert peak == pytest.approx(max(answer["peak_gb"].values()), abs=0.05)
    assert f"--num_gpus {answer['hardware']['num_gpus']}" in script.read_text()


# The random model's answers fail every task's rule (GSM8K's too), so the GRPO recipes score with a length reward
# instead, given by file path (the step's subprocess cannot import this repository's `tests` package).
LENGTH = f"{ROOT / 'tests' / 'helpers' / 'toy_rewards.py'}:answer_length"
ALGORITHM_FLAGS = ("--advantage_estimator", "--n_samples_per_prompt", "--kl_ctl", "--kl_loss_coef")


def algorithm_flags(script: Path) -> list[str]:
    """A GRPO recipe's estimator, group size and KL settings, with the length reward for its reward function."""
    args, out = main_py_args(script), ["--reward_funcs", LENGTH]
    for flag in ALGORITHM_FLAGS:
        out += [flag, args[args.index(flag) + 1]]
    return out


@pytest.mark.parametrize("script", RECIPES, ids=[p.stem for p in RECIPES])
def test_recipe_flags_run_on_a_scaled_down_model(script: Path, run_step, engine_cache, tmp_path):
    """The 7B recipe's memory flags (ZeRO stages, offload, LoRA, checkpointing, quantized roles, hybrid
    mode, batch sizes) on the built-in model, one rank, one PPO step with short sequences. A GRPO recipe
    runs its algorithm (no critic, no reward model) with a length reward."""
    from tests.conftest import read_metrics, tiny_model_folder, tiny_reward_folder

    actor = tiny_model_folder(engine_cache)
    grpo = script in GRPO_RECIPES
    scoring = (algorithm_flags(script) if grpo
               else ["--critic_model_name_or_path", str(tiny_reward_folder(engine_cache, tmp_path / "rm"))])
    flags = memory_flags(script)
    out = tmp_path / "out"
    run_step("step3_rlhf/main.py", ["--actor_model_name_or_path", str(actor), *scoring, "--output_dir", str(out),
                                    *flags, "--max_prompt_seq_len", "16", "--max_answer_seq_len", "8",
                                    "--test_stop_step", "1", "--eval_prompts", "4", "--disable_tqdm"])
    rows = [r for r in read_metrics(out) if "ppo/policy_loss" in r]
    losses = ("ppo/policy_loss",) if grpo else ("ppo/policy_loss", "ppo/value_loss")
    assert len(rows) == 1 and all(abs(rows[0][k]) < 1e3 for k in losses)
    assert json.loads((out / "actor" / "config.json").read_text())["model_type"] == "llama"
    if grpo:  # the recipe's group: 16 prompts x 8 answers, and no critic anywhere
        assert rows[0]["rollout/sequences"] == 128 and "ppo/value_loss" not in rows[0]
        assert not (out / "critic").exists()
