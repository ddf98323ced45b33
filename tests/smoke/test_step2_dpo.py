"""Step 2's DPO alternative end to end on the built-in tiny model and the bundled pairs, one process: LoRA with
the policy's adapters switched off as the reference, TRL's metric names, the saved folder, and --resume after a
kill giving the same run bit for bit. One test (two rounds of processes) to keep the default run short."""
from __future__ import annotations

import math
from concurrent.futures import ThreadPoolExecutor

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
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    with ThreadPoolExecutor(2) as pool:  # the uninterrupted run and the killed one side by side
        done = pool.submit(run_step, "step2_dpo/main.py", ["--output_dir", str(straight), *COMMON])
        killed = pool.submit(run_step, "step2_dpo/main.py", ["--output_dir", str(resumed), *COMMON], check=False,
                             env={"RLHF_ENGINE_FAULT": "kill:5"}).result()
        done.result()
    assert killed.returncode == -9 and max(train_losses(resumed)) == 4, killed.stderr[-2000:]
    run_step("step2_dpo/main.py", ["--output_dir", str(resumed), *COMMON, "--resume"])

    # Resumed from the step-3 checkpoint: steps 4-8 again, the same numbers and the same weights.
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 9))
    assert [a[s] for s in range(4, 9)] == [b[s] for s in range(4, 9)]
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)

    rows = read_metrics(straight)
    evals = [r for r in rows if "eval/loss" in r]
    # Before training the policy (LoRA B = 0) is its reference exactly: every reward 0, the loss log 2.
    assert evals[0]["step"] == 0 and evals[0]["eval/loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert evals[0]["eval/rewards/margins"] == 0.0
    train_rows = [r for r in rows if "train/loss" in r]
    assert all(name in r and math.isfinite(r[name]) for r in train_rows for name in TRL_NAMES)
    assert all(f"eval/{name}" in evals[-1] for name in TRL_NAMES)
    assert train_rows[-1]["train/lr"] > 0 and train_rows[-1]["memory/peak_gb"] > 0
    assert (straight / "curves.png").is_file() and (straight / "config.yaml").is_file()

    # The saved folder is a plain causal LM with LoRA fused: the adapted projections changed, the rest did not.
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(str(straight))
    base = load_file(str(tiny_model_folder(engine_cache) / "model.safetensors"))
    assert wa.keys() == base.keys()
    for key, value in wa.items():
        changed = not torch.equal(base[key].to(value.dtype), value)
        assert changed == key.endswith("proj.weight"), key
