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


def test_dpo_runs_step_1_and_step_2_dpo_then_the_evaluation(tmp_path):
    args = e2e.parse_args(["--algorithm", "dpo", "--output_dir", str(tmp_path)])
    assert args.step == [1, 2]
    stages = e2e.plan(args, tmp_path, "tiny", "tiny", "cpu")
    assert [s.name for s in stages] == ["step 1 (SFT)", "step 2 (DPO)", "evaluation"]
    step2 = stages[1]
    assert step2.command[1] == str(ROOT / "step2_dpo" / "training_scripts" / "tiny" / "run_demo.sh")
    assert step2.command[2:] == [str(tmp_path / "step2_dpo"), "", str(tmp_path / "step1_sft"), "2"]
    assert step2.log == tmp_path / "logs" / "step2_dpo.log" and step2.step == 2
    script = Path(step2.command[1]).read_text()
    assert '"$ROOT/step2_dpo/main.py"' in script and "--model_name_or_path \"$MODEL\"" in script
    # The actor's ZeRO stage is DPO's (it trains the actor); step 2's extra flags go to step2_dpo/main.py.
    args = e2e.parse_args(["--algorithm", "dpo", "--step", "2", "--actor-zero-stage", "3", "--reward-zero-stage", "1",
                           "--step2-args=--beta 0.2"])
    (step2, evaluation) = e2e.plan(args, tmp_path, "tiny", "tiny", "cpu")
    assert step2.command[2:] == [str(tmp_path / "step2_dpo"), "3", str(tmp_path / "step1_sft"), "2", "--beta", "0.2"]
    assert evaluation.name == "evaluation"


@pytest.mark.parametrize("argv,message", [
    (["--algorithm", "dpo", "--step", "3"], "--algorithm dpo trains the actor in step 2 (DPO), in place of the reward "
     "model and step 3: drop 3 from --step (e.g. --step 1 2)"),
    (["--algorithm", "dpo", "--step", "1", "2", "3"], "drop 3 from --step"),
])
def test_dpo_has_no_step_3(argv, message):
    with pytest.raises(UserError, match=re.escape(message)):
        e2e.parse_args(argv)


def test_dpo_refusals_and_the_missing_step_1_hint(tmp_path):
    with pytest.raises(UserError, match=r"--algorithm dpo runs the demo's bundled task; for --actor-model 1\.3b run "
                       r"step 1, then step2_dpo/main\.py"):
        e2e.check_choices("1.3b", "350m", "opt", "single_gpu", "dpo")
    with pytest.raises(UserError, match=r"step 2 \(DPO\) needs the model of step 1 \(SFT\) in .*step1_sft.*"
                       r"\(--step 1 2\)"):
        e2e.check_inputs([2], tmp_path, "dpo")
    (tmp_path / "step1_sft").mkdir()
    (tmp_path / "step1_sft" / "config.json").write_text("{}")
    e2e.check_inputs([2], tmp_path, "dpo")
    assert e2e.restart_command(["--algorithm", "dpo"], [2]) == "python e2e_rlhf.py --algorithm dpo --step 2"


def test_a_dpo_evaluation_compares_every_actor_the_folder_holds(tmp_path):
    dpo = tmp_path / "step2_dpo"
    dpo.mkdir()
    with pytest.raises(UserError, match=r"step2_dpo/config\.yaml is missing: step 2 did not finish; run --step 2"):
        e2e.evaluation_command(tmp_path, [], "dpo")
    (dpo / "config.yaml").write_text(yaml.safe_dump({"data": {"data_path": [], "max_seq_len": 64},
                                                     "train": {"seed": 7}}))
    command = e2e.evaluation_command(tmp_path, ["--eval_prompts", "50"], "dpo")
    text = " ".join(command)
    # Sampled as step 3's evaluation samples (evaluate.py's defaults: the demo's lengths, temperature 1).
    assert f"--models sft={tmp_path / 'step1_sft'} dpo={dpo} --output_dir" in text
    assert "--reward_model" not in text and "--max_prompt_seq_len" not in text and "--greedy" not in text
    assert "--seed 7" in text and "--temperature 1.0 --top_p 1.0 --top_k 0" in text
    assert command[-2:] == ["--eval_prompts", "50"]
    for folder in ("step3_rlhf/actor", "step3_grpo/actor", "step3_rloo", "step2_reward"):  # rloo: no model saved
        (tmp_path / folder).mkdir(parents=True)
        (tmp_path / folder / "config.json").write_text("{}") if folder != "step3_rloo" else None
    text = " ".join(e2e.evaluation_command(tmp_path, [], "dpo"))
    assert (f"--models sft={tmp_path / 'step1_sft'} dpo={dpo} ppo={tmp_path / 'step3_rlhf' / 'actor'} "
            f"grpo={tmp_path / 'step3_grpo' / 'actor'} --reward_model {tmp_path / 'step2_reward'}") in text
    # A GRPO run's evaluation shows the DPO actor an earlier run left (a saved model), after PPO's.
    (dpo / "config.json").write_text("{}")
    (tmp_path / "step3_grpo" / "config.yaml").write_text(yaml.safe_dump({"ppo": {"do_sample": True}}))
    text = " ".join(e2e.evaluation_command(tmp_path, [], "grpo"))
    assert f"grpo={tmp_path / 'step3_grpo' / 'actor'} ppo={tmp_path / 'step3_rlhf' / 'actor'} dpo={dpo} --" in text


def test_step_names_and_folders_per_algorithm(tmp_path):
    """DPO's trained step is 2 (named and foldered as DPO), the critic-free ones' 3; PPO keeps its three steps."""
    assert e2e.parse_args([]).step == [1, 2, 3] and e2e.parse_args(["--algorithm", "rloo"]).step == [1, 3]
    names = {(n, a): e2e.step_name(n, a) for n in (1, 2, 3) for a in ("ppo", "dpo", "grpo")}
    assert names[2, "ppo"] == "step 2 (reward model)" and names[2, "dpo"] == "step 2 (DPO)"
    assert names[3, "grpo"] == "step 3 (GRPO)" and names[1, "dpo"] == "step 1 (SFT)"
    assert [e2e.step_output(n, "dpo") for n in (1, 2)] == ["step1_sft", "step2_dpo"]
    assert [e2e.step_output(n, "ppo") for n in (1, 2, 3)] == ["step1_sft", "step2_reward", "step3_rlhf"]
    # Step 1 alone trains no actor to compare: no evaluation stage.
    args = e2e.parse_args(["--algorithm", "dpo", "--step", "1"])
    assert [s.name for s in e2e.plan(args, tmp_path, "tiny", "tiny", "cpu")] == ["step 1 (SFT)"]
