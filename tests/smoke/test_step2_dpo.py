"""Step 2's DPO alternative end to end on the built-in tiny model and the bundled pairs, one process: LoRA with
the policy's adapters switched off as the reference, TRL's metric names, the saved folder, and --resume after a
kill giving the same run bit for bit. One test (a killed run and its resume) to keep the default run short."""
from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import read_metrics, tiny_model_folder, train_losses

pytestmark = pytest.mark.smoke

COMMON = ["--max_seq_len", "64", "--per_device_train_batch_size", "8", "--per_device_eval_batch_size", "16",
          "--eval_iters", "2", "--lora_dim", "4", "--only_optimize_lora", "--learning_rate", "1e-3",
          "--dropout", "0.1", "--save_interval", "3", "--test_stop_step", "8"]
TRL_NAMES = ("rewards/chosen", "rewards/rejected", "rewards/accuracies", "rewards/margins", "logps/chosen",
             "logps/rejected")


def test_lora_dpo_trains_saves_and_resumes_bit_exact(run_step, tmp_path, engine_cache):
    # One run, killed while step 6's checkpoint is half-written: its steps 4-6 ran uninterrupted from the step-3
    # checkpoint, so they are what a resume from step 3 must reproduce (no separate uninterrupted run needed).
    out = tmp_path / "dpo"
    killed = run_step("step2_dpo/main.py", ["--output_dir", str(out), *COMMON], check=False,
                      env={"RLHF_ENGINE_FAULT": "killsave:6"})
    assert killed.returncode == -9 and max(train_losses(out)) == 6, killed.stderr[-2000:]
    first = train_losses(out)
    # checkpoint-6/ (the fused weights after step 6) is written before the DeepSpeed state the kill cuts short.
    weights6 = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    resumed = run_step("step2_dpo/main.py", ["--output_dir", str(out), *COMMON, "--resume"])

    # The unsealed step-6 state is skipped; from step 3, steps 4-6 again: the same numbers and the same weights
    # (steps 5 and 6 use the restored optimizer state, dropout's RNG and data position too).
    assert "skipping checkpoint step6" in resumed.stderr, resumed.stderr[-2000:]
    again = train_losses(out)
    assert sorted(again) == list(range(1, 9))
    assert [first[s] for s in range(4, 7)] == [again[s] for s in range(4, 7)]
    rewritten = load_file(str(out / "checkpoint-6" / "model.safetensors"))
    assert weights6.keys() == rewritten.keys() and all(torch.equal(weights6[k], rewritten[k]) for k in weights6)

    rows = read_metrics(out)
    evals = [r for r in rows if "eval/loss" in r]
    # Before training the policy (LoRA B = 0) is its reference exactly: every reward 0, the loss log 2.
    assert evals[0]["step"] == 0 and evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/rewards/margins"] == 0.0
    train_rows = [r for r in rows if "train/loss" in r]
    assert all(name in r and math.isfinite(r[name]) for r in train_rows for name in TRL_NAMES)
    assert all(f"eval/{name}" in evals[-1] for name in TRL_NAMES)
    assert train_rows[-1]["train/lr"] > 0 and train_rows[-1]["memory/peak_gb"] > 0
    assert (out / "curves.png").is_file() and (out / "config.yaml").is_file()

    # The saved folder is a plain causal LM with LoRA fused: the adapted projections changed, the rest did not.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(out))
    base = load_file(str(tiny_model_folder(engine_cache) / "model.safetensors"))
    final = load_file(str(out / "model.safetensors"))
    assert final.keys() == base.keys()
    for key, value in final.items():
        changed = not torch.equal(base[key].to(value.dtype), value)
        assert changed == key.endswith("proj.weight"), key
