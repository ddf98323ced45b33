"""e2e_rlhf.py without running anything: which scripts it picks, what it passes them, and what it refuses."""
from __future__ import annotations

import re
import sys
from pathlib import Path

import pytest
import yaml

import e2e_rlhf as e2e
from engine.errors import UserError
from tests.conftest import ROOT


def commands(argv: list[str], out: Path) -> list[list[str]]:
    args = e2e.parse_args(argv + ["--output_dir", str(out)])
    family = e2e.ACTOR_MODELS[args.actor_model]
    reward = args.reward_model or e2e.DEFAULT_REWARD.get(family, args.actor_model)
    deployment = args.deployment_type or "cpu"
    e2e.check_choices(args.actor_model, reward, family, deployment)
    return [s.command for s in e2e.plan(args, out, family, reward, deployment)]


def test_the_demo_passes_each_step_the_previous_outputs(tmp_path):
    step1, step2, step3, evaluation = commands(["--deployment-type", "cpu", "--step2-args", "--num_train_epochs 1"],
                                               tmp_path)
    demo = "training_scripts/tiny/run_demo.sh"
    assert step1[1].endswith(f"step1_sft/{demo}") and step1[2:] == [str(tmp_path / "step1_sft"), "", "2"]
    assert step2[1].endswith(f"step2_reward/{demo}")
    assert step2[2:] == [str(tmp_path / "step2_reward"), "", str(tmp_path / "step1_sft"), "2",
                         "--num_train_epochs", "1"]
    assert step3[2:] == [str(tmp_path / "step1_sft"), str(tmp_path / "step2_reward"), "", "",
                         str(tmp_path / "step3_rlhf"), "2"]
    assert callable(evaluation)  # built once step 3 has saved its config


@pytest.mark.parametrize("deployment,ranks", [("single_gpu", "1"), ("single_node", "")])
def test_the_demo_on_gpus(tmp_path, deployment, ranks):
    step1 = commands(["--deployment-type", deployment, "--step", "1"], tmp_path)[0]
    assert step1[-1] == ranks


@pytest.mark.parametrize("actor,deployment", [("1.3b", "single_gpu"), ("1.3b", "single_node"), ("66b", "multi_node"),
                                              ("llama2-7b", "single_node"), ("llama2-7b-lora", "single_node"),
                                              ("6.7b", "single_gpu"), ("6.7b", "single_node"), ("13b", "single_node"),
                                              ("30b", "single_node")])
def test_gpu_recipes_use_existing_scripts_with_their_positional_arguments(tmp_path, actor, deployment):
    step1, step2, step3, _ = commands(["--actor-model", actor, "--deployment-type", deployment,
                                       "--actor-zero-stage", "3"], tmp_path)
    for command in (step1, step2, step3):
        assert Path(command[1]).is_file()
    assert step1[2:] == [str(tmp_path / "step1_sft"), "3"]
    assert step2[2:] == [str(tmp_path / "step2_reward"), ""]
    assert step3[2:] == [str(tmp_path / "step1_sft"), str(tmp_path / "step2_reward"), "3", "",
                         str(tmp_path / "step3_rlhf")]


@pytest.mark.parametrize("actor,deployment,script", [
    ("6.7b", "single_gpu", "opt/single_gpu/run_6.7b_lora.sh"), ("13b", "single_node", "opt/single_node/run_13b.sh"),
    ("30b", "single_node", "opt/single_node/run_30b_lora.sh"), ("6.7b", "single_node", "opt/single_node/run_6.7b.sh")])
def test_dschat_sizes_pick_dschat_scripts(tmp_path, actor, deployment, script):
    """DeepSpeed-Chat's e2e sizes and deployments; a size shipped only as LoRA uses its _lora script."""
    step1, step2, step3, _ = commands(["--actor-model", actor, "--deployment-type", deployment], tmp_path)
    assert step1[1] == str(ROOT / "step1_sft" / "training_scripts" / script)
    assert step3[1] == str(ROOT / "step3_rlhf" / "training_scripts" / script)
    assert step2[1] == str(ROOT / "step2_reward" / "training_scripts" / "opt" / deployment / "run_350m.sh")


@pytest.mark.parametrize("argv,message", [
    (["--actor-model", "1.3b", "--deployment-type", "cpu"], "needs GPUs"),
    (["--deployment-type", "multi_node"], "runs on one machine"),
    (["--actor-model", "1.3b", "--reward-model", "tiny"], "not of the actor's family"),
    (["--actor-model", "llama2-7b", "--deployment-type", "single_gpu"], "one node of 8 GPUs"),
    (["--actor-model", "llama2-7b", "--reward-model", "llama2-7b-lora", "--deployment-type", "single_node"],
     "goes with --reward-model llama2-7b"),
    (["--actor-model", "66b", "--deployment-type", "single_node"], "no launch script for step 1 (SFT) with model 66b"),
    (["--step1-args", "--seed 'unclosed"], "--step1-args: cannot split"),
])
def test_combinations_without_a_recipe_are_refused(tmp_path, argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        commands(argv, tmp_path)


def test_a_later_step_needs_the_earlier_outputs(tmp_path):
    with pytest.raises(UserError, match=r"step 3 \(PPO RLHF\) needs the model of step 1 \(SFT\).*--step 1 2 3"):
        e2e.check_inputs([3], tmp_path)
    for n in (1, 2):
        (tmp_path / e2e.STEP_DIRS[n]).mkdir()
        (tmp_path / e2e.STEP_DIRS[n] / "config.json").write_text("{}")
    e2e.check_inputs([3], tmp_path)
    e2e.check_inputs([2, 3], tmp_path)


def test_evaluation_uses_what_step3_ran_with(tmp_path):
    rlhf = tmp_path / "step3_rlhf"
    (rlhf / "actor_ema").mkdir(parents=True)
    (rlhf / "actor_ema" / "config.json").write_text("{}")
    (rlhf / "config.yaml").write_text(yaml.safe_dump({
        "data": {"data_path": ["my/data.jsonl"], "max_prompt_seq_len": 24, "max_answer_seq_len": 8},
        "ppo": {"do_sample": True, "temperature": 0.7, "top_p": 0.9, "top_k": 5}, "train": {"seed": 7}}))
    command = e2e.evaluation_command(tmp_path, ["--eval_prompts", "50"])
    assert command[:2] == [sys.executable, str(ROOT / "step3_rlhf" / "evaluate.py")]
    text = " ".join(command)
    assert f"--models sft={tmp_path / 'step1_sft'} rlhf={rlhf / 'actor'} ema={rlhf / 'actor_ema'}" in text
    for part in ("--max_prompt_seq_len 24", "--max_answer_seq_len 8", "--seed 7", "--data_path my/data.jsonl",
                 "--temperature 0.7 --top_p 0.9 --top_k 5", f"--reward_model {tmp_path / 'step2_reward'}"):
        assert part in text
    assert command[-2:] == ["--eval_prompts", "50"]
    (rlhf / "config.yaml").write_text(yaml.safe_dump({"ppo": {"do_sample": False}}))
    assert "--greedy" in e2e.evaluation_command(tmp_path, [])
    (rlhf / "config.yaml").unlink()
    with pytest.raises(UserError, match="step 3 did not finish"):
        e2e.evaluation_command(tmp_path, [])


def test_a_critic_free_algorithm_runs_steps_1_and_3_with_the_rule(tmp_path):
    step1, step3, evaluation = commands(["--algorithm", "grpo"], tmp_path)
    assert step1[1].endswith("step1_sft/training_scripts/tiny/run_demo.sh")
    assert step3[1].endswith("step3_rlhf/training_scripts/tiny/run_demo_critic_free.sh")
    assert step3[2:] == [str(tmp_path / "step1_sft"), "grpo", "", str(tmp_path / "step3_grpo"), "2"]
    script = Path(step3[1]).read_text()
    assert "--reward_funcs engine.rewards.builtin:sort_rule" in script and "critic_model_name_or_path" not in script
    assert [n for n in e2e.parse_args(["--algorithm", "rloo", "--step", "3"]).step] == [3]
    with pytest.raises(UserError, match=r"drop 2 from --step"):
        e2e.parse_args(["--algorithm", "grpo", "--step", "2", "3"])
    with pytest.raises(UserError, match=r"--algorithm grpo runs the demo's bundled task"):
        e2e.check_choices("llama2-7b", "llama2-7b", "llama2", "single_node", "grpo")
    # Step 3 needs only step 1's model, and the hint leaves step 2 out.
    with pytest.raises(UserError, match=r"step 3 \(GRPO\) needs the model of step 1 \(SFT\).*--step 1 3\)"):
        e2e.check_inputs([3], tmp_path, "grpo")
    (tmp_path / "step1_sft").mkdir()
    (tmp_path / "step1_sft" / "config.json").write_text("{}")
    e2e.check_inputs([3], tmp_path, "grpo")


def test_a_critic_free_evaluation_compares_with_ppo_when_it_is_there(tmp_path):
    grpo = tmp_path / "step3_grpo"
    grpo.mkdir()
    (grpo / "config.yaml").write_text(yaml.safe_dump({"ppo": {"do_sample": True}}))
    text = " ".join(e2e.evaluation_command(tmp_path, [], "grpo"))
    assert f"--models sft={tmp_path / 'step1_sft'} grpo={grpo / 'actor'} --" in text and "--reward_model" not in text
    for folder in ("step3_rlhf/actor", "step2_reward"):  # an earlier PPO run's actor and reward model
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}")
    text = " ".join(e2e.evaluation_command(tmp_path, [], "grpo"))
    assert f"grpo={grpo / 'actor'} ppo={tmp_path / 'step3_rlhf' / 'actor'}" in text
    assert f"--reward_model {tmp_path / 'step2_reward'}" in text


def test_log_tail_shows_lines_as_a_terminal_does():
    text = "a\nbar 10%\rbar 50%\rbar 100%\n\nerror: boom\n"
    assert e2e.last_lines(text, 2) == ["bar 100%", "error: boom"]
    assert e2e.last_lines(text, 10) == ["a", "bar 100%", "error: boom"]


def test_restart_command_keeps_the_users_flags_and_replaces_the_steps():
    argv = ["--output_dir", "out dir", "--step", "1", "2", "3", "--step3-args=--ppo_epochs 2"]
    assert e2e.restart_command(argv, [2, 3]) == ("python e2e_rlhf.py --output_dir 'out dir' "
                                                 "'--step3-args=--ppo_epochs 2' --step 2 3")
    assert e2e.restart_command([], [3]) == "python e2e_rlhf.py --step 3"


def test_the_cpu_deployment_keeps_the_ranks_off_the_gpus(monkeypatch):
    """The launcher shows every rank the GPUs whatever CUDA_VISIBLE_DEVICES says; DS_ACCELERATOR=cpu decides."""
    import torch

    from engine.runtime.distributed import gpu_wanted

    env = e2e.stage_env("cpu", 2)
    assert env["DS_ACCELERATOR"] == "cpu" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert "DS_ACCELERATOR" not in e2e.stage_env("single_gpu", 2)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    assert not gpu_wanted()
    monkeypatch.delenv("DS_ACCELERATOR")
    assert gpu_wanted()
