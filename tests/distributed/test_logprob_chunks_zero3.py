"""Chunked log-probs under ZeRO-3 on two CPU ranks, with the hybrid mode and LoRA on a frozen base (the LM
head partitioned and frozen): the same PPO and PTX losses, KL and entropy as with the full logits."""
from __future__ import annotations

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.distributed

ARGS = ["--actor_zero_stage", "3", "--critic_zero_stage", "3", "--enable_hybrid_engine", "--actor_lora_dim", "8",
        "--critic_lora_dim", "8", "--only_optimize_lora", "--dtype", "fp32", "--max_prompt_seq_len", "32",
        "--max_answer_seq_len", "12", "--per_device_generation_batch_size", "4", "--per_device_training_batch_size",
        "2", "--eval_prompts", "0", "--test_stop_step", "2", "--unsup_coef", "1.0"]
KEYS = ("ppo/policy_loss", "ppo/ptx_loss", "ppo/entropy", "ppo/value_loss")


def test_zero3_hybrid_lora_chunks_equal_the_full_logits(run_step, tiny_roles, tmp_path):
    actor, critic = tiny_roles
    text = tmp_path / "ptx.txt"
    text.write_text("\n".join(f"the digits {i} {i + 1} {i + 2} follow each other" for i in range(200)))
    rows = {}
    for chunk in ("0", "5"):
        out = tmp_path / f"chunk{chunk}"
        run_step("step3_rlhf/main.py", ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path",
                                        str(critic), *ARGS, "--unsupervised_dataset_name", str(text),
                                        "--output_dir", str(out), "--logprob_chunk_size", chunk], nprocs=2)
        rows[chunk] = {r["step"]: r for r in read_metrics(out) if "ppo/policy_loss" in r}
    assert sorted(rows["0"]) == sorted(rows["5"]) == [1, 2]
    for step in (1, 2):
        for key in KEYS:
            assert rows["5"][step][key] == pytest.approx(rows["0"][step][key], rel=1e-4, abs=1e-6), (step, key)
