"""benchmarks/trl_grpo_compare.py's run of our GRPO (the half that needs no TRL), 2 steps on the built-in model:
the worker's result has the curve at the planned evaluations, one time per step and step 3's phase split."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.conftest import ROOT, offline_env, tiny_model_folder

pytestmark = pytest.mark.smoke


def test_our_worker_reports_curve_and_step_times(engine_cache, tmp_path):
    model = tiny_model_folder(engine_cache)
    result = tmp_path / "ours.json"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "trl_grpo_compare.py"), "--worker", "ours", "--seed", "3",
           "--result", str(result), "--sft_model", str(model), "--work_dir", str(tmp_path), "--steps", "3",
           "--eval_every", "2", "--eval_prompts", "64", "--prompts_per_step", "2", "--group_size", "4",
           "--max_answer_len", "8"]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(engine_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(result.read_text())
    assert (r["trainer"], r["seed"]) == ("ours", 3)
    # evaluations at 0, every 2 steps and at the last step; completions = steps x 2 prompts x 4
    assert [(p["step"], p["completions"]) for p in r["curve"]] == [(0, 0), (2, 16), (3, 24)]
    assert all(0.0 <= p["rule_success"] <= 1.0 for p in r["curve"])
    assert len(r["step_s"]) == 3 and all(t > 0 for t in r["step_s"])
    assert set(r["phase_s_median"]) == {"generate", "experience", "train"}
    assert all(0 < v <= max(r["step_s"]) for v in r["phase_s_median"].values())
    assert r["eval_s"] > 0 and r["startup_s"] > 0
    assert r["wall_s"] == pytest.approx(r["startup_s"] + sum(r["step_s"]) + r["eval_s"])
