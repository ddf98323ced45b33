"""Evaluation summaries and the pipeline report on hand-made numbers (no model runs)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from engine.eval.compare import (
    Answers,
    markdown_samples,
    markdown_table,
    rule_checks,
    rule_truth,
    summarize,
    win_rates,
)
from engine.eval.report import before_after, build_report, verdict


def test_win_rate_counts_wins_and_half_ties_against_the_first_model():
    scores = torch.tensor([[1.0, 2.0, 3.0, 4.0],     # the baseline: against itself, four ties -> 0.5
                           [2.0, 2.0, 0.0, 5.0],     # wins on 0 and 3, ties on 1, loses on 2: (2 + 0.5) / 4
                           [0.0, 0.0, 0.0, 0.0]])    # loses everywhere -> 0
    assert win_rates(scores).tolist() == [0.5, 0.625, 0.0]


def test_rule_truth_only_where_every_prompt_is_the_task():
    prompts = [" Human: sort 3 1 2 Assistant:", " Human: sort 9 9 0 Assistant:"]
    assert rule_truth(prompts, [" 1 2 3", " 0 9"]).tolist() == [True, False]
    assert rule_truth(prompts + [" Human: hello Assistant:"], [" 1 2 3", " 0 9 9", " hi"]) is None
    assert rule_truth([], []) is None


def test_rule_checks_count_the_task_prompts_of_a_mixed_batch():
    # What step 3's evaluation sums: 2 of 3 prompts are the task's, and 1 of those 2 answers is right.
    prompts = [" Human: sort 3 1 2 Assistant:", " Human: hello Assistant:", " Human: sort 9 9 0 Assistant:"]
    checked, correct = rule_checks(prompts, [" 1 2 3", " 1 2 3", " 0 9"])
    assert checked.tolist() == [True, False, True] and correct.tolist() == [True, False, False]


def answers(scores, kl, lengths, correct=None) -> Answers:
    return Answers([f"a{i}" for i in range(len(scores))], torch.tensor(scores), torch.tensor(kl),
                   torch.tensor(lengths), None if correct is None else torch.tensor(correct))


def test_summary_of_hand_made_answers():
    sft = answers([1.0, -1.0, 0.0, 2.0], [0.0, 0.0, 0.0, 0.0], [4, 6, 4, 6], [True, False, False, False])
    rlhf = answers([2.0, -1.0, 1.0, 1.0], [0.5, 0.1, 0.3, 0.3], [5, 5, 5, 0], [True, True, False, False])
    out = summarize({"sft": sft, "rlhf": rlhf})
    assert list(out) == ["sft", "rlhf"]
    assert out["sft"] == pytest.approx({
        "score_mean": 0.5, "score_std": (5 / 4) ** 0.5,  # deviations 0.5, -1.5, -0.5, 1.5: squares sum to 5
        "win_rate_vs_first": 0.5, "kl_to_ref": 0.0, "response_len_mean": 5.0, "response_len_std": 1.0,
        "response_len_max": 6.0, "empty_answers": 0, "rule_success_rate": 0.25})
    # rlhf: wins on prompts 0 and 2, ties on 1, loses on 3 -> 2.5 / 4; KL (0.5 + 0.1 + 0.3 + 0.3) / 4 = 0.3
    assert out["rlhf"]["win_rate_vs_first"] == 0.625
    assert out["rlhf"]["kl_to_ref"] == pytest.approx(0.3)
    assert out["rlhf"]["score_mean"] == 0.75 and out["rlhf"]["rule_success_rate"] == 0.5
    assert out["rlhf"]["response_len_mean"] == 3.75 and out["rlhf"]["empty_answers"] == 1


def test_summary_without_a_rule_has_no_rule_success():
    out = summarize({"a": answers([1.0], [0.0], [3])})
    assert "rule_success_rate" not in out["a"] and out["a"]["score_std"] == 0.0
    assert "rule success" not in markdown_table(out)


def test_markdown_table_and_samples():
    a = answers([1.0, 2.0], [0.0, 0.0], [3, 3], [True, False])
    b = Answers(["x | y", ""], torch.tensor([0.5, 3.0]), torch.zeros(2), torch.tensor([2, 0]),
                torch.tensor([False, True]))
    table = markdown_table(summarize({"sft": a, "rlhf": b}))
    lines = table.strip().split("\n")
    assert lines[0].startswith("| model |") and "win rate vs sft" in lines[0] and "rule success" in lines[0]
    assert lines[3].split("|")[1].strip() == "rlhf" and lines[3].strip().endswith("| 0.500 |")
    samples = markdown_samples(["p | 1", "p2"], {"sft": a, "rlhf": b}, count=5)
    rows = samples.strip().split("\n")
    assert len(rows) == 4  # header, rule, two prompts (count caps at the prompts there are)
    assert "`x \\| y` (0.50 ✗)" in rows[2] and "*(empty)* (3.00 ✓)" in rows[3] and "`p \\| 1`" in rows[2]


def test_without_a_reward_model_there_are_no_scores_or_win_rates():
    a = Answers(["1 2", "3"], None, torch.zeros(2), torch.tensor([3, 2]), torch.tensor([True, False]))
    b = Answers(["1 2", "4"], None, torch.tensor([0.2, 0.4]), torch.tensor([3, 2]), torch.tensor([True, True]))
    out = summarize({"sft": a, "grpo": b})
    assert not any(k in row for row in out.values() for k in ("score_mean", "score_std", "win_rate_vs_first"))
    assert out["grpo"]["rule_success_rate"] == 1.0 and out["grpo"]["kl_to_ref"] == pytest.approx(0.3)
    header = markdown_table(out).split("\n")[0]
    assert "RM score" not in header and "win rate" not in header and "rule success" in header
    rows = markdown_samples(["p1", "p2"], {"sft": a, "grpo": b}, count=2).strip().split("\n")
    assert "`3` (✗)" in rows[3] and "`4` (✓)" in rows[3]
    ok, line = verdict(out, candidate="grpo")
    assert ok is True and line == "GRPO beat SFT: rule success 0.500 -> 1.000 (+0.500); KL to reference 0.300"


def model_row(score, rule=None, win=0.5, kl=0.0):
    row = {"score_mean": score, "win_rate_vs_first": win, "kl_to_ref": kl, "response_len_mean": 5.0}
    return row | ({"rule_success_rate": rule} if rule is not None else {})


@pytest.mark.parametrize("sft,rlhf,beat", [
    (model_row(-3.0, 0.15), model_row(-1.5, 0.22, 0.6, 0.4), True),
    (model_row(-3.0, 0.15), model_row(-1.5, 0.10), False),       # score up, rule down: reward hacking
    (model_row(-3.0, 0.15), model_row(-3.5, 0.20), False),
    (model_row(1.0), model_row(2.0), True),                        # no rule: the score decides
])
def test_verdict(sft, rlhf, beat):
    ok, line = verdict({"sft": sft, "rlhf": rlhf})
    assert ok is beat
    assert line.startswith("RLHF beat SFT" if beat else "RLHF did NOT beat SFT")
    assert f"{sft['score_mean']:.3f} -> {rlhf['score_mean']:.3f}" in line
    assert ("rule success" in line) == ("rule_success_rate" in sft)


def test_verdict_without_both_models():
    assert verdict({"sft": model_row(1.0)})[0] is None
    no_scores = {"kl_to_ref": 0.0, "response_len_mean": 5.0}  # no reward model and no rule: nothing to compare
    assert verdict({"sft": no_scores, "rlhf": no_scores})[0] is None


def test_before_after_takes_first_and_last_logged_values():
    rows = [{"step": 0, "eval/a": 1.0}, {"step": 1, "train/loss": 3.0}, {"step": 2, "eval/a": 0.5, "eval/b": None},
            {"step": 3, "eval/a": 0.25}]
    assert before_after(rows, ["eval/a", "eval/b", "eval/c"]) == {"eval/a": (1.0, 0.25)}


def write_jsonl(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_report_gathers_every_step_the_evaluation_and_the_verdict(tmp_path):
    write_jsonl(tmp_path / "step1_sft" / "metrics.jsonl", [{"step": 0, "eval/loss": 5.0, "eval/perplexity": 148.0},
                                                           {"step": 5, "train/loss": 2.0},
                                                           {"step": 10, "eval/loss": 3.0, "eval/perplexity": 20.0}])
    write_jsonl(tmp_path / "step2_reward" / "metrics.jsonl", [{"step": 0, "eval/reward_accuracy": 0.5},
                                                              {"step": 4, "eval/reward_accuracy": 0.9}])
    write_jsonl(tmp_path / "step3_rlhf" / "metrics.jsonl", [
        {"step": 0, "eval/score_mean": -3.0, "eval/rule_success": 0.15},
        {"step": 1, "rollout/score_mean": -2.0, "rollout/kl": 0.1, "ppo/policy_loss": 0.1, "ppo/value_loss": 1.0},
        {"step": 2, "eval/score_mean": -1.5, "eval/rule_success": 0.22}])
    models = {"sft": model_row(-3.0, 0.15), "rlhf": model_row(-1.5, 0.22, 0.6, 0.4)}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_report.json").write_text(json.dumps(
        {"models": models, "prompts": 400, "decoding": {"do_sample": True}, "seed": 1}))
    (tmp_path / "eval" / "eval_report.md").write_text("header\n\n| model |\n|---|\n| sft |\n")
    (tmp_path / "eval" / "samples.md").write_text("| prompt |\n")
    pipeline = {"command": "python e2e_rlhf.py", "deployment": "cpu", "seconds": {"step 1 (SFT)": 30.0}}

    report = build_report(tmp_path, pipeline)
    names = {p.name for p in report.iterdir()}
    assert {"README.md", "verdict.txt", "summary.json", "step1_sft.png", "step2_reward.png", "step3_rlhf.png",
            "eval_report.json", "eval_report.md", "samples.md", "metrics"} <= names
    assert (report / "step3_rlhf.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((report / "summary.json").read_text())
    assert summary["rlhf_beat_sft"] is True
    assert summary["steps"]["step1_sft"]["before_after"]["eval/perplexity"] == [148.0, 20.0]
    assert summary["steps"]["step3_rlhf"]["before_after"]["eval/rule_success"] == [0.15, 0.22]
    readme = (report / "README.md").read_text()
    assert "**RLHF beat SFT: reward score -3.000 -> -1.500 (+1.500); rule success 0.150 -> 0.220 (+0.070)" in readme
    assert "| sft |" in readme and "![Step 3: PPO RLHF](step3_rlhf.png)" in readme and "| total | 30 |" in readme

    # Rebuilt without the pipeline record, it keeps the previous one; no staging folder is left behind.
    again = build_report(tmp_path)
    assert json.loads((again / "summary.json").read_text())["pipeline"] == pipeline
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".report-")]


def test_report_of_a_partial_run_has_what_exists(tmp_path):
    write_jsonl(tmp_path / "step1_sft" / "metrics.jsonl", [{"step": 0, "eval/perplexity": 100.0}])
    report = build_report(tmp_path, {})
    summary = json.loads((report / "summary.json").read_text())
    assert list(summary["steps"]) == ["step1_sft"] and "verdict" not in summary
    assert not (report / "verdict.txt").exists()


def test_report_of_a_critic_free_run_beside_ppo(tmp_path):
    """A GRPO run's report: its own step-3 folder (curves, before -> after), the verdict names it, PPO's kept."""
    write_jsonl(tmp_path / "step1_sft" / "metrics.jsonl", [{"step": 0, "eval/perplexity": 100.0}])
    write_jsonl(tmp_path / "step3_rlhf" / "metrics.jsonl", [{"step": 0, "eval/rule_success": 0.15},
                                                            {"step": 2, "eval/rule_success": 0.2}])
    write_jsonl(tmp_path / "step3_grpo" / "metrics.jsonl", [
        {"step": 0, "eval/rule_success": 0.17},
        {"step": 1, "rollout/reward_mean": 0.2, "rollout/frac_reward_zero_std": 0.5, "ppo/policy_loss": 0.0},
        {"step": 2, "eval/rule_success": 0.39}])
    models = {"sft": {"kl_to_ref": 0.0, "rule_success_rate": 0.17},
              "grpo": {"kl_to_ref": 0.8, "rule_success_rate": 0.4}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_report.json").write_text(json.dumps(
        {"models": models, "prompts": 400, "decoding": {"do_sample": True}, "seed": 1}))
    (tmp_path / "eval" / "eval_report.md").write_text("header\n\n| model |\n")

    report = build_report(tmp_path, {"candidate": "grpo"})
    summary = json.loads((report / "summary.json").read_text())
    assert list(summary["steps"]) == ["step1_sft", "step3_rlhf", "step3_grpo"]
    assert summary["steps"]["step3_grpo"]["before_after"]["eval/rule_success"] == [0.17, 0.39]
    assert summary["rlhf_beat_sft"] is True
    assert summary["verdict"] == "GRPO beat SFT: rule success 0.170 -> 0.400 (+0.230); KL to reference 0.800"
    assert "![Step 3: GRPO](step3_grpo.png)" in (report / "README.md").read_text()
    assert (report / "step3_grpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_report_of_a_dpo_run_beside_ppo_and_grpo(tmp_path):
    """A DPO run's report (`e2e_rlhf.py --algorithm dpo`): its step-2 folder with TRL's metric names (curves,
    before -> after), between the reward model and step 3; the verdict names DPO and carries the reward score."""
    write_jsonl(tmp_path / "step1_sft" / "metrics.jsonl", [{"step": 0, "eval/perplexity": 100.0}])
    write_jsonl(tmp_path / "step3_grpo" / "metrics.jsonl", [{"step": 0, "eval/rule_success": 0.17}])
    write_jsonl(tmp_path / "step2_dpo" / "metrics.jsonl", [
        {"step": 0, "eval/loss": 0.693, "eval/rewards/accuracies": 0.0, "eval/rewards/margins": 0.0},
        {"step": 1, "train/loss": 0.69, "rewards/accuracies": 0.5, "rewards/margins": 0.01, "logps/chosen": -3.0},
        {"step": 2, "eval/loss": 0.2, "eval/rewards/accuracies": 0.9, "eval/rewards/margins": 2.5}])
    models = {"sft": {"kl_to_ref": 0.0, "rule_success_rate": 0.17, "score_mean": -1.0},
              "dpo": {"kl_to_ref": 0.3, "rule_success_rate": 0.3, "score_mean": -0.5, "win_rate_vs_first": 0.6},
              "grpo": {"kl_to_ref": 0.8, "rule_success_rate": 0.4}}
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "eval_report.json").write_text(json.dumps(
        {"models": models, "prompts": 400, "decoding": {"do_sample": True}, "seed": 1}))
    (tmp_path / "eval" / "eval_report.md").write_text("header\n\n| model |\n")

    report = build_report(tmp_path, {"candidate": "dpo", "algorithm": "dpo"})
    summary = json.loads((report / "summary.json").read_text())
    assert list(summary["steps"]) == ["step1_sft", "step2_dpo", "step3_grpo"]
    assert summary["steps"]["step2_dpo"]["before_after"] == {
        "eval/loss": [0.693, 0.2], "eval/rewards/accuracies": [0.0, 0.9], "eval/rewards/margins": [0.0, 2.5]}
    assert summary["steps"]["step2_dpo"]["steps"] == 2 and summary["rlhf_beat_sft"] is True
    assert summary["verdict"] == ("DPO beat SFT: reward score -1.000 -> -0.500 (+0.500); rule success 0.170 -> "
                                  "0.300 (+0.130); win rate vs sft 0.600, KL to reference 0.300")
    assert "![Step 2: DPO](step2_dpo.png)" in (report / "README.md").read_text()
    assert (report / "step2_dpo.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (report / "metrics" / "step2_dpo.jsonl").is_file()
