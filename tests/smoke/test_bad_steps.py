"""NaN losses (step 1) and NaN rewards (step 3), injected at chosen steps with RLHF_ENGINE_FAULT, on the
built-in model in bf16 (the CPU default): a single bad step is skipped and counted, the weights stay
finite, no checkpoint is written during a bad streak, and --max_bad_steps bad steps in a row stop the
run with a message naming the step and the last good checkpoint. (Step 2: test_step2_reward.py.)"""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics, tiny_model_folder, tiny_reward_folder

pytestmark = pytest.mark.smoke


def checkpoints(out) -> list[str]:
    return sorted(p.name for p in out.glob("checkpoint-*"))


def all_finite(path) -> bool:
    return all(bool(torch.isfinite(t.float()).all()) for t in load_file(str(path)).values())


def test_step1_skips_a_nan_step_and_stops_after_two_in_a_row(run_step, tmp_path):
    out = tmp_path / "sft"
    # Step 3 alone is bad; then steps 5 and 6 in a row, which --max_bad_steps 2 does not allow.
    args = ["--output_dir", str(out), "--per_device_train_batch_size", "16", "--max_seq_len", "64",
            "--max_bad_steps", "2", "--save_interval", "1", "--test_stop_step", "10"]
    proc = run_step("step1_sft/main.py", args, check=False, env={"RLHF_ENGINE_FAULT": "nan:3,nan:5-"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("error: step 6: 2 consecutive bad steps (the last: NaN or inf loss and update skipped by the optimizer"
            in proc.stderr)
    assert "the last good checkpoint is step 4" in proc.stderr
    rows = {r["step"]: r for r in read_metrics(out) if "train/bad_steps" in r}
    assert sorted(rows) == [1, 2, 3, 4, 5, 6]  # the stopping step is logged too
    assert [rows[s]["train/bad_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 3]
    # bf16 at ZeRO 0: DeepSpeed found the NaN gradient and skipped each bad update
    assert [rows[s]["train/skipped_steps"] for s in range(1, 7)] == [0, 0, 1, 1, 2, 3]
    assert rows[3]["train/loss"] is None and math.isfinite(rows[4]["train/loss"])  # NaN is `null` in the JSONL
    # No checkpoint during a bad streak: --resume would restart from step 4's good weights.
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-2", "checkpoint-4"]
    assert all_finite(out / "checkpoint-4" / "model.safetensors")  # step 3's NaN update was not applied


def test_step3_skips_a_nan_reward_step_and_stops_after_two_in_a_row(run_step, engine_cache, tmp_path):
    actor = tiny_model_folder(engine_cache)
    critic = tiny_reward_folder(engine_cache, tmp_path / "rm")
    out = tmp_path / "ppo"
    # PPO step 2 alone has NaN reward scores; then steps 4 and 5 in a row. The adaptive KL controller and
    # --normalize_reward's running moments would turn one NaN into NaN rewards at every later step.
    args = ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic), "--output_dir",
            str(out), "--max_prompt_seq_len", "32", "--max_answer_seq_len", "16", "--per_device_generation_batch_size",
            "32", "--per_device_training_batch_size", "16", "--num_warmup_steps", "0", "--eval_prompts", "4",
            "--target_kl", "0.5", "--kl_horizon", "100", "--normalize_reward", "--max_bad_steps", "2",
            "--save_interval", "1", "--test_stop_step", "10"]
    proc = run_step("step3_rlhf/main.py", args, check=False, env={"RLHF_ENGINE_FAULT": "nan:2,nan:4-"})
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert ("error: PPO step 5: 2 consecutive bad steps (the last: NaN or inf reward, KL or value in the rollout); "
            "the last good checkpoint is step 3") in proc.stderr
    rows = {r["step"]: r for r in read_metrics(out) if "ppo/bad_steps" in r}
    assert [rows[s]["ppo/bad_steps"] for s in range(1, 6)] == [0, 1, 1, 2, 3]
    assert rows[2]["rollout/nonfinite_sequences"] == 32 and rows[2]["rollout/score_mean"] is None
    assert "ppo/policy_loss" not in rows[2]  # its updates were skipped, not run on NaN
    assert all(math.isfinite(rows[s][k]) for s in (1, 3) for k in ("ppo/policy_loss", "ppo/value_loss"))
    assert rows[3]["rollout/nonfinite_sequences"] == 0  # the moments and the KL coefficient stayed finite
    # The KL coefficient logged at step s is the one step s - 1 left: step 1 moved it (KL 0 < target
    # 0.5: 0.1 * (1 - 0.2 * 32 / 100) = 0.0936), the bad step 2 did not.
    kl_coef = [rows[s]["ppo/kl_coef"] for s in (1, 2, 3)]
    assert kl_coef[0] == 0.1 and kl_coef[1] == kl_coef[2] == pytest.approx(0.0936)
    assert [rows[s]["ppo/actor_skipped_steps"] for s in range(1, 6)] == [0] * 5  # nothing reached the optimizer
    assert checkpoints(out) == ["checkpoint-1", "checkpoint-3"]
    assert all_finite(out / "checkpoint-3" / "actor" / "model.safetensors")
