"""The step-3 benchmark end to end on one CPU process: random tiny models, 2 PPO steps (1 measured), the
JSON and Markdown reports, the model-state count against hand-worked bytes, and the A/B comparison."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, offline_env

pytestmark = pytest.mark.smoke

SCRIPT = str(ROOT / "benchmarks" / "rlhf_step.py")


def test_benchmark_reports_throughput_memory_and_compares(engine_cache, tmp_path):
    out = tmp_path / "a.json"
    cmd = [sys.executable, SCRIPT, "--actor_model", "tiny", "--steps", "2", "--warmup_steps", "1",
           "--max_prompt_seq_len", "16", "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "4",
           "--per_device_training_batch_size", "4", "--dtype", "bf16", "--run_dir", str(tmp_path / "run"),
           "--cache_dir", str(engine_cache / "bench_models"), "--out", str(out)]
    env = offline_env(engine_cache)
    env.pop("RLHF_BENCH_LAUNCH_TIME", None)  # launch time: this process's start
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert json.loads(proc.stdout.strip().splitlines()[-1]) == report  # also printed as one JSON line
    assert (tmp_path / "a.md").is_file() and "first PPO step" in (tmp_path / "a.md").read_text()

    assert report["steps"] == {"run": 2, "warmup": 1, "measured": 1}
    tp, times, mem = report["throughput"], report["time"], report["memory"]
    assert tp["samples_per_s"] > 0 and tp["gen_tokens_per_s"] > 0 and tp["train_tokens_per_s"] > 0
    assert tp["mfu"] is None and report["decode"]["roofline_ratio"] is None  # no peak or bandwidth for a CPU
    assert sum(times["fractions"].values()) == pytest.approx(1.0)
    assert times["e2e_s"] == pytest.approx(report["per_step"][1]["perf/e2e_s"])
    # Trained tokens: 4 sequences x 1 PPO epoch x (16 + 16) tokens per training second
    assert tp["train_tokens_per_s"] == pytest.approx(4 * 32 / times["seconds"]["train"])
    assert 0 < mem["baseline_gb"] < mem["peak_gb"]["train"]
    assert mem["growth_gb"]["train"] == pytest.approx(mem["peak_gb"]["train"] - mem["baseline_gb"])
    # Start-up (issue 18): the first step is the sum of its phases; launch (this process's start, no launcher)
    # to its end covers imports and model loading too; the peak RSS (getrusage) exceeds the baseline.
    start, first = report["startup"], report["per_step"][0]
    assert start["first_step_s"] == pytest.approx(sum(first[f"timing/{k}_s"] for k in times["seconds"]))
    assert start["launch_from"] == "process start" and len(start["launch_to_first_step_s"]) == 1
    assert start["launch_to_first_step_s_max"] > start["first_step_s"] > 0
    assert start["peak_rss_gb"] == [start["peak_rss_gb_max"]] and start["peak_rss_gb_max"] > mem["baseline_gb"]

    # Model states of the ZeRO-0 bf16 run, counted from the live tensors (per parameter: 2 bytes of weights;
    # 2 bytes of bf16 + 4 of fp32 gradients; fp32 master + two Adam moments = 12 bytes, plus 4-byte step
    # counters); the frozen reference has weights only.
    n, gib = report["config"]["actor"]["params"], 2**30
    actor, reference = mem["roles"]["actor"], mem["roles"]["reference"]
    assert n == report["config"]["actor"]["trainable_params"] > 100_000
    assert report["decode"]["actor_param_bytes"] == report["config"]["actor"]["param_bytes"] == 2 * n
    assert actor["parameters"]["cpu"] * gib == 2 * n
    assert actor["gradients"]["cpu"] * gib == 6 * n
    assert actor["optimizer"]["cpu"] * gib == pytest.approx(12 * n, rel=1e-3)
    assert reference["parameters"]["cpu"] * gib == 2 * n and reference["total"]["cpu"] * gib == 2 * n
    assert report["planner"] is not None or report["planner_note"]
    # PPO trains on one answer per prompt: 4 rows per step, and every role with a critic
    assert tp["trained_samples_per_step"] == 4
    assert tp["s_per_trained_sample"] == pytest.approx(times["e2e_s"] / 4)
    assert list(mem["roles"]) == report["config"]["roles"] == ["actor", "critic", "reference", "reward"]
    assert mem["model_states_gb"] == pytest.approx(sum(r["total"]["cpu"] for r in mem["roles"].values()))

    # A/B: a second report with twice the samples/s compares as 2.00x
    faster = dict(report, throughput=dict(tp, samples_per_s=2 * tp["samples_per_s"]))
    (tmp_path / "b.json").write_text(json.dumps(faster))
    table = subprocess.run([sys.executable, SCRIPT, "--compare", str(out), str(tmp_path / "b.json")], cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert table.returncode == 0, table.stderr
    assert "| metric | a | b |" in table.stdout
    samples_row = next(line for line in table.stdout.splitlines() if line.startswith("| samples/s |"))
    assert samples_row.endswith("(2.00x) |")
    as_json = subprocess.run([sys.executable, SCRIPT, "--compare", str(out), str(tmp_path / "b.json"), "--json"],
                             cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert as_json.returncode == 0, as_json.stderr
    assert json.loads(as_json.stdout)["ratios_to_reference"]["samples/s"] == {"a": 1.0, "b": 2.0}


def test_benchmark_runs_a_critic_free_estimator(engine_cache, tmp_path):
    """GRPO, 2 prompts x 4 answers: no critic is built or reported, the critic's folder is the reward model,
    and the time per trained sample counts the 8 answers."""
    out = tmp_path / "grpo.json"
    cmd = [sys.executable, SCRIPT, "--actor_model", "tiny", "--steps", "2", "--warmup_steps", "1",
           "--max_prompt_seq_len", "16", "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "2",
           "--per_device_training_batch_size", "4", "--dtype", "bf16", "--run_dir", str(tmp_path / "run"),
           "--cache_dir", str(engine_cache / "bench_models"), "--out", str(out), "--",
           "--advantage_estimator", "grpo", "--n_samples_per_prompt", "4",
           "--reward_funcs", str(ROOT / "benchmarks" / "length_reward.py") + ":answer_length"]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(engine_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    cfg, tp, mem = report["config"], report["throughput"], report["memory"]
    assert "critic" not in cfg and Path(cfg["reward"]["folder"]).name.startswith("llama-critic-")
    assert cfg["roles"] == list(mem["roles"]) == ["actor", "reference", "reward"]
    assert cfg["advantage_estimator"] == "grpo" and cfg["n_samples_per_prompt"] == 4
    assert report["per_step"][1]["rollout/sequences"] == tp["trained_samples_per_step"] == 8  # 2 prompts x 4
    assert tp["s_per_trained_sample"] == pytest.approx(report["time"]["e2e_s"] / 8)
    # the reward model is the critic's random folder, frozen: weights only (2 bytes per parameter in bf16)
    assert mem["roles"]["reward"]["total"]["cpu"] * 2**30 == 2 * cfg["reward"]["params"]
    md = (tmp_path / "grpo.md").read_text()
    assert "no critic" in md and "s per trained sample (8 per PPO step)" in md and "| critic |" not in md
    if report["planner"] is not None:  # the planner plans the same roles
        assert "critic" not in report["planner"]["roles"]


def test_benchmark_without_reward_model_builds_the_actor_alone(engine_cache, tmp_path):
    """--no_reward_model: the reward function scores alone; with no KL term there is no reference either."""
    out = tmp_path / "rloo.json"
    cmd = [sys.executable, SCRIPT, "--actor_model", "tiny", "--steps", "2", "--max_prompt_seq_len", "16",
           "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "2", "--per_device_training_batch_size",
           "4", "--run_dir", str(tmp_path / "run"), "--cache_dir", str(engine_cache / "bench_models"),
           "--out", str(out),
           "--no_reward_model", "--", "--advantage_estimator", "rloo", "--n_samples_per_prompt", "2", "--kl_ctl", "0",
           "--reward_funcs", str(ROOT / "benchmarks" / "length_reward.py") + ":answer_length"]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(engine_cache), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads(out.read_text())
    assert report["config"]["roles"] == list(report["memory"]["roles"]) == ["actor"]
    assert "reward" not in report["config"] and report["throughput"]["trained_samples_per_step"] == 4  # 2 x 2
    assert report["memory"]["model_states_gb"] == pytest.approx(report["memory"]["roles"]["actor"]["total"]["cpu"])


def test_flags_the_benchmark_owns_are_refused_after_the_separator(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, "--compare", str(tmp_path / "missing.json"), "x.json"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot read a benchmark report" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--steps", "2", "--", "--max_prompt_seq_len", "8"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--max_prompt_seq_len after --" in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--no_reward_model", "--", "--advantage_estimator", "grpo"],
                          cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "give --reward_funcs after --" in proc.stderr and "Traceback" not in proc.stderr
    proc = subprocess.run([sys.executable, SCRIPT, "--json"], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--json formats the --compare table" in proc.stderr
