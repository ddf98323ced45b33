"""`python e2e_rlhf.py --algorithm grpo --step 3` at a reduced size (the `e2e_grpo` fixture: GRPO from the PPO
pipeline's step-1 model, in a copy of its folder): no step 2, no critic, no reference; the evaluation compares
SFT, GRPO and the PPO actor by the rule alone (no reward model in that folder), and GRPO beats SFT on it.
The e2e tier (left out of the default run)."""
from __future__ import annotations

import json

import pytest

from tests.conftest import E2E_GRPO_STEPS, read_metrics

pytestmark = pytest.mark.smoke

# Rule success gained over SFT at this size (50 GRPO steps), measured; see the test that uses it.
GRPO_RISE_MEASURED = 0.12


def test_grpo_pipeline_writes_its_own_folder_and_report(e2e_grpo):
    out, proc = e2e_grpo
    grpo = out / "step3_grpo"
    assert (grpo / "actor" / "model.safetensors").is_file() and not (grpo / "critic").exists()
    assert not (out / "step2_reward").exists()
    log = (out / "logs" / "step3_grpo.log").read_text()
    assert "critic" not in json.dumps([r for r in read_metrics(grpo) if "rollout/reward_mean" in r])
    assert "--reward_funcs" in log or "sort_rule" in log
    summary = json.loads((out / "report" / "summary.json").read_text())
    assert summary["pipeline"]["algorithm"] == "grpo" and set(summary["pipeline"]["seconds"]) == {
        "step 3 (GRPO)", "evaluation"}
    assert summary["steps"]["step3_grpo"]["steps"] == E2E_GRPO_STEPS
    assert (out / "report" / "step3_grpo.png").is_file() and "step3_rlhf" in summary["steps"]
    assert summary["verdict"] in proc.stdout


def test_grpo_beats_sft_on_the_rule_beside_ppo(e2e_grpo):
    out, _ = e2e_grpo
    report = json.loads((out / "eval" / "eval_report.json").read_text())
    models = report["models"]
    assert list(models) == ["sft", "grpo", "ppo"] and report["reward_model"] is None
    assert not any("score_mean" in row for row in models.values())  # no reward model: the rule decides
    sft, grpo = models["sft"], models["grpo"]
    # Measured (2026-12-07, 2 CPU ranks, 397 prompts x 4 answers, 50 steps): rule success 0.173 -> 0.293 (PPO's
    # 40-step actor 0.196), KL 0.54; the full 250-step pipeline reaches 0.402. The bar is half the measured rise.
    assert grpo["rule_success_rate"] >= sft["rule_success_rate"] + GRPO_RISE_MEASURED / 2, models
    assert grpo["kl_to_ref"] > 0.0
    verdict = (out / "report" / "verdict.txt").read_text()
    assert verdict.startswith("GRPO beat SFT: rule success") and "reward score" not in verdict

