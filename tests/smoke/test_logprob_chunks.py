"""Steps 1 and 3 with chunked log-probs (--logprob_chunk_size 5, several chunks per sequence) log the same
losses as with the full logits (0)."""
from __future__ import annotations

import pytest

from tests.conftest import read_metrics, train_losses

pytestmark = pytest.mark.smoke


def test_step1_chunked_loss_equals_the_full_logits(run_step, tmp_path):
    losses = {}
    for chunk in ("0", "5"):
        out = tmp_path / f"chunk{chunk}"
        run_step("step1_sft/main.py", ["--output_dir", str(out), "--per_device_train_batch_size", "8",
                                       "--max_seq_len", "64", "--test_stop_step", "3", "--dtype", "fp32",
                                       "--logprob_chunk_size", chunk])
        losses[chunk] = train_losses(out)
    assert len(losses["0"]) == 3
    assert losses["5"] == pytest.approx(losses["0"], rel=1e-4)


def test_step3_chunked_ppo_and_ptx_equal_the_full_logits(run_step, tiny_roles, tmp_path):
    actor, critic = tiny_roles
    text = tmp_path / "ptx.txt"
    text.write_text("\n".join(f"the digits {i} {i + 1} {i + 2} follow each other" for i in range(200)))
    rows = {}
    for chunk in ("0", "5"):
        out = tmp_path / f"chunk{chunk}"
        run_step("step3_rlhf/main.py", [
            "--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic), "--output_dir",
            str(out), "--max_prompt_seq_len", "32", "--max_answer_seq_len", "16", "--per_device_generation_batch_size",
            "4", "--per_device_training_batch_size", "4", "--dtype", "fp32", "--unsupervised_dataset_name", str(text),
            "--unsup_coef", "1.0", "--test_stop_step", "1", "--eval_prompts", "0", "--logprob_chunk_size", chunk])
        rows[chunk] = next(r for r in read_metrics(out) if "ppo/policy_loss" in r)
    for key in ("ppo/policy_loss", "ppo/ptx_loss", "ppo/entropy", "rollout/kl"):
        assert key in rows["0"], key
        assert rows["5"][key] == pytest.approx(rows["0"][key], rel=1e-4, abs=1e-6), key
