"""Gradient accumulation equals the big batch (in the spirit of TRL's invariance tests): the same examples in
one micro-batch or spread over an accumulation window give the same loss at every step and the same final
weights, for step 1 (ragged answer lengths) and step 2 (a window whose last micro-batch holds fewer pairs).
fp32, dropout off, a constant learning rate (the two runs' schedules may differ in length), one process.
Step 3's PPO losses: tests/unit/test_ppo_trainer_updates.py."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import train_losses

pytestmark = pytest.mark.smoke

COMMON = ["--dtype", "fp32", "--dropout", "0.0", "--lr_scheduler_type", "constant", "--num_warmup_steps", "0",
          "--max_seq_len", "64"]


def assert_same_training(a: Path, b: Path, steps: list[int], loss_tol: float, weight_tol: float) -> None:
    la, lb = train_losses(a), train_losses(b)
    assert sorted(la) == sorted(lb) == steps
    for step in steps:
        assert la[step] == pytest.approx(lb[step], rel=loss_tol), step
    wa, wb = load_file(str(a / "model.safetensors")), load_file(str(b / "model.safetensors"))
    assert wa.keys() == wb.keys()
    for key in wa:
        torch.testing.assert_close(wa[key], wb[key], rtol=0.0, atol=weight_tol, msg=key)


def test_step1_batch_1_x_accumulation_8_equals_batch_8(run_step, tmp_path):
    # The bundled sorting task: answers of different lengths, so the per-micro-batch token mean of
    # DeepSpeed-Chat would weigh the tokens of short answers more.
    runs = {}
    for batch, accumulation in ((8, 1), (1, 8)):
        out = runs[batch] = tmp_path / f"b{batch}x{accumulation}"
        run_step("step1_sft/main.py", ["--output_dir", str(out), *COMMON, "--learning_rate", "1e-3",
                                       "--per_device_train_batch_size", str(batch),
                                       "--gradient_accumulation_steps", str(accumulation), "--test_stop_step", "5"])
    # Measured (float32 sums in another order): losses agree to 6e-8 relative, weights to 1.7e-6 absolute
    # (Adam's m / sqrt(v) turns rounding noise in near-zero gradients into moves of up to the learning
    # rate). DeepSpeed-Chat's per-micro-batch mean, same runs: losses of steps 2-5 differ by 1.9e-4 to
    # 1.4e-3 relative, weights by 7.5e-3.
    assert_same_training(runs[8], runs[1], list(range(1, 6)), loss_tol=1e-5, weight_tol=2e-4)


def write_pairs(folder: Path, n_train: int) -> Path:
    """A data folder of sorting pairs with answers of different lengths (n_train train pairs, 4 eval pairs)."""
    folder.mkdir()

    def rows(n: int, offset: int) -> str:
        out = []
        for i in range(n):
            digits = [str((7 * (i + offset) + 3 * k) % 10) for k in range(2 + (i + offset) % 5)]
            out.append(json.dumps({"prompt": f" Human: sort {' '.join(digits)} Assistant:",
                                   "chosen": " " + " ".join(sorted(digits)),
                                   "rejected": " " + " ".join(sorted(digits, reverse=True)[:-1] or ["0"])}))
        return "\n".join(out) + "\n"

    (folder / "train.jsonl").write_text(rows(n_train, 0))
    (folder / "eval.jsonl").write_text(rows(4, 100))
    return folder


def test_step2_ragged_window_equals_one_batch(run_step, tmp_path):
    # 10 pairs: batches of 4 with accumulation 3 make one window of 4 + 4 + 2 pairs per epoch (the loader
    # keeps the short last batch); batch 10 holds the same 10 pairs in one micro-batch. A mean of the three
    # micro-batch means (DeepSpeed-Chat) would weigh the last two pairs twice as much.
    data = write_pairs(tmp_path / "pairs", 10)
    runs = {}
    for batch, accumulation in ((10, 1), (4, 3)):
        out = runs[batch] = tmp_path / f"b{batch}x{accumulation}"
        run_step("step2_reward/main.py", ["--output_dir", str(out), *COMMON, "--data_path", str(data),
                                          "--data_split", "0,1,0", "--learning_rate", "1e-3",
                                          "--num_train_epochs", "3", "--per_device_train_batch_size", str(batch),
                                          "--gradient_accumulation_steps", str(accumulation)])
    # Measured: losses agree to 1.4e-7 relative, weights to 2.2e-5 absolute (see step 1). DeepSpeed-Chat's
    # mean of micro-batch means, same runs: losses differ by 2.5e-4 to 1.5e-2 relative, weights by 5.0e-3.
    assert_same_training(runs[10], runs[4], [1, 2, 3], loss_tol=1e-5, weight_tol=2e-4)
