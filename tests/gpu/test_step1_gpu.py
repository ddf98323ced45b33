"""Step 1 on a GPU (fp16, DeepSpeed-Chat's default dtype there). Skipped without CUDA."""
from __future__ import annotations

import pytest
import torch

from tests.conftest import eval_rows

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_fp16_zero2_on_gpu(run_step, tmp_path):
    out = tmp_path / "gpu"
    run_step("step1_sft/main.py", ["--output_dir", str(out), "--dtype", "fp16", "--zero_stage", "2",
                                   "--max_seq_len", "64"])
    evals = eval_rows(out)
    assert evals[-1]["eval/perplexity"] < evals[0]["eval/perplexity"] / 5
