"""step3_rlhf/evaluate.py on built-in tiny models: identical models tie with zero KL, another model does
not; bad input is a clean error."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from engine.errors import UserError
from tests.conftest import ROOT, offline_env, tiny_model_folder

pytestmark = pytest.mark.smoke


def _evaluate(engine_cache, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "step3_rlhf" / "evaluate.py"), *args], capture_output=True,
                          text=True, timeout=300, env=offline_env(engine_cache))


@pytest.fixture(scope="module")
def reward_folder(engine_cache, tmp_path_factory) -> Path:
    """A one-label reward model with a random head on the built-in model (scores are arbitrary but fixed)."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    base = tiny_model_folder(engine_cache)
    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_pretrained(base, num_labels=1)
    folder = tmp_path_factory.mktemp("rm")
    model.save_pretrained(folder)
    AutoTokenizer.from_pretrained(base).save_pretrained(folder)
    return folder


def test_identical_models_tie_with_zero_kl_and_another_model_differs(engine_cache, reward_folder, tmp_path):
    same, other = tiny_model_folder(engine_cache), tiny_model_folder(engine_cache, seed=7)
    out = tmp_path / "eval"
    proc = _evaluate(engine_cache, "--models", f"a={same}", f"b={same}", f"c={other}", "--reward_model",
                     str(reward_folder), "--eval_prompts", "24", "--samples_per_prompt", "2", "--batch_size", "10",
                     "--output_dir", str(out))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((out / "eval_report.json").read_text())
    a, b, c = (report["models"][n] for n in "abc")
    assert report["prompts"] == 24 and report["samples_per_prompt"] == 2 and report["baseline"] == "a"
    assert report["decoding"]["do_sample"] is True
    # Same weights and the same sampling seed: the same answers, so every prompt is a tie and KL is exactly 0.
    assert b["win_rate_vs_first"] == 0.5 and a["kl_to_ref"] == 0.0 and b["kl_to_ref"] == 0.0
    assert b["score_mean"] == a["score_mean"] and b["rule_success_rate"] == a["rule_success_rate"]
    # Other random weights: other answers, and a KL to `a` clearly above zero.
    assert c["win_rate_vs_first"] != 0.5 and c["kl_to_ref"] > 0.1  # measured: 0.43 on 24 prompts
    for key in ("score_mean", "win_rate_vs_first", "kl_to_ref", "response_len_mean", "rule_success_rate"):
        assert key in a, key
    table = (out / "eval_report.md").read_text()
    assert "| a |" in table and "| c |" in table and "| b |" in table
    assert proc.stdout.count("| b |") == 1  # the table is printed too
    samples = (out / "samples.md").read_text().strip().split("\n")
    assert len(samples) == 2 + 12 and "Human: sort" in samples[2]  # 12 distinct prompts, the first answer to each
    assert len({row.split(" | ")[0] for row in samples[2:]}) == 12


@pytest.mark.parametrize("case", ["missing model", "duplicate name", "not a reward model", "bad count"])
def test_bad_input_is_refused_before_anything_is_written(engine_cache, reward_folder, tmp_path, case):
    from step3_rlhf.evaluate import main

    tiny = tiny_model_folder(engine_cache)
    args, message = {
        "missing model": ([f"a={tmp_path / 'none'}"], "no such model folder"),
        "duplicate name": ([f"a={tiny}", f"a={tiny}"], "the name 'a' is given twice"),
        "not a reward model": ([f"a={tiny}"], "labels; a reward model has 1"),
        "bad count": ([f"a={tiny}", "--samples_per_prompt", "0"], "--samples_per_prompt"),
    }[case]
    rm = tiny if case == "not a reward model" else reward_folder
    out = tmp_path / "eval"
    with pytest.raises(UserError, match=message):
        main(["--models", *args, "--reward_model", str(rm), "--output_dir", str(out)])
    assert not out.exists()


def test_a_user_error_exits_cleanly(engine_cache, tmp_path):
    proc = _evaluate(engine_cache, "--models", str(tmp_path / "none"), "--reward_model", str(tmp_path))
    assert proc.returncode == 2 and "no such model folder" in proc.stderr and "Traceback" not in proc.stderr
