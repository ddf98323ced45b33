"""Step 1 with 2 CPU ranks under the deepspeed launcher: ZeRO-3 + offload + LoRA + checkpointing."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import eval_rows, tiny_model_folder, train_losses

pytestmark = pytest.mark.distributed


@pytest.fixture(scope="module")
def local_inputs(tmp_path_factory, engine_cache) -> tuple[Path, Path]:
    """A local model folder and a local jsonl dataset (prompt + response schema)."""
    from engine.data import sort_task

    data = tmp_path_factory.mktemp("data") / "sort.jsonl"
    rows = sort_task.generate(1500, seed=3)
    data.write_text("".join(json.dumps({"prompt": r.prompt, "response": r.chosen}) + "\n" for r in rows))
    return tiny_model_folder(engine_cache), data


def test_zero3_offload_lora_checkpointing(run_step, local_inputs, tmp_path):
    model_dir, data = local_inputs
    out = tmp_path / "z3"
    run_step("step1_sft/main.py", ["--model_name_or_path", str(model_dir), "--data_path", str(data),
                                   "--zero_stage", "3", "--offload", "--lora_dim", "8", "--gradient_checkpointing",
                                   "--dtype", "bf16", "--per_device_train_batch_size", "8",
                                   "--output_dir", str(out)], nprocs=2)
    evals = eval_rows(out)
    # LoRA trains the adapters, embeddings, norms and head; the adapted Linear weights stay frozen (as in
    # DeepSpeed-Chat). Measured 288 -> 120 (2.40x) with --seed 1234, 2.37x / 2.39x with seeds 1 / 2
    # (3.2x when those weights trained too).
    assert evals[-1]["eval/perplexity"] < evals[0]["eval/perplexity"] / 2
    # A fresh process loads the folder as a plain Hugging Face model.
    probe = ("import sys, torch; from transformers import AutoModelForCausalLM as M; "
             "m = M.from_pretrained(sys.argv[1]); assert not any('lora' in k for k in m.state_dict()); "
             "print(sum(p.numel() for p in m.parameters()))")
    proc = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert int(proc.stdout.strip().splitlines()[-1]) > 0


def test_zero3_resume_after_kill_two_ranks_is_bit_identical(run_step, tmp_path):
    """12 steps straight == a run whose rank 0 is SIGKILLed mid step 6 (the launcher then stops rank 1),
    resumed from step 4 on 2 ranks. (Resuming on another rank count: tests/distributed/test_elastic_resume.py.)"""
    common = ["--zero_stage", "3", "--lora_dim", "4", "--dropout", "0.1", "--dtype", "fp32",
              "--per_device_train_batch_size", "8", "--max_seq_len", "64", "--save_interval", "4",
              "--test_stop_step", "12"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_step("step1_sft/main.py", ["--output_dir", str(straight), *common], nprocs=2)
    killed = run_step("step1_sft/main.py", ["--output_dir", str(resumed), *common], nprocs=2, check=False,
                      env={"RLHF_ENGINE_FAULT": "kill:6:0"})
    assert killed.returncode != 0 and max(train_losses(resumed)) == 5, killed.stderr[-2000:]
    run_step("step1_sft/main.py", ["--output_dir", str(resumed), *common, "--resume"], nprocs=2)
    a, b = train_losses(straight), train_losses(resumed)
    assert sorted(a) == sorted(b) == list(range(1, 13))
    assert [a[s] for s in range(5, 13)] == [b[s] for s in range(5, 13)]
    wa, wb = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_torchrun_two_ranks(run_step, tmp_path):
    out = tmp_path / "torchrun"
    run_step("step1_sft/main.py", ["--output_dir", str(out), "--zero_stage", "2", "--max_seq_len", "64",
                                   "--per_device_train_batch_size", "8", "--test_stop_step", "5"],
             nprocs=2, launcher="torchrun")
    assert max(train_losses(out)) == 5
    assert (out / "model.safetensors").is_file()
