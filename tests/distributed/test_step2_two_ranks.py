"""Step 2 with 2 CPU ranks: ZeRO-3 + LoRA on a local model folder and a local preference jsonl."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import read_metrics, tiny_model_folder

pytestmark = pytest.mark.distributed


def test_zero3_lora_reward_model(run_step, engine_cache, tmp_path):
    from engine.data import sort_task

    model_dir = tiny_model_folder(engine_cache)  # a local model folder, standing in for a step-1 output
    data = tmp_path / "prefs.jsonl"
    rows = sort_task.generate(2000, seed=5)
    data.write_text("".join(json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) + "\n"
                            for r in rows))
    out = tmp_path / "rm"
    run_step("step2_reward/main.py", ["--model_name_or_path", str(model_dir), "--data_path", str(data),
                                      "--zero_stage", "3", "--lora_dim", "8", "--dtype", "bf16",
                                      "--learning_rate", "1e-3", "--per_device_train_batch_size", "8",
                                      "--max_seq_len", "64", "--eval_interval", "25", "--output_dir", str(out),
                                      "--data_split", "0,10,0", "--num_train_epochs", "2"],
             nprocs=2)
    acc = [r["eval/reward_accuracy"] for r in read_metrics(out) if "eval/reward_accuracy" in r]
    # All 2000 pairs go to step 2 (1800 train, 200 held out), 2 epochs (224 steps). Measured final accuracy:
    # 0.85 (--seed 1234, the default), 0.745 / 0.87 / 0.76 (seeds 1 / 2 / 3), 0.80 (seed 1234 with torch and
    # oneDNN held to AVX2 kernels, as on another CPU); from 0.36-0.56. The bar is the lowest less 2 binomial
    # standard deviations of 200 pairs (0.03 each). One epoch of 40% of the pairs (45 steps, 80 held out)
    # ended anywhere in 0.61-0.80 by seed and CPU kernels, too close to a coin flip for any bar.
    assert acc[0] < 0.7 and acc[-1] >= 0.68 and acc[-1] > acc[0]
    probe = ("import sys; from transformers import AutoModelForSequenceClassification as M; "
             "m = M.from_pretrained(sys.argv[1]); assert m.config.num_labels == 1; "
             "assert not any('lora' in k for k in m.state_dict()); print('ok')")
    proc = subprocess.run([sys.executable, "-c", probe, str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]
