"""The report of a pipeline run (what `e2e_rlhf.py` writes to <output_dir>/report): one folder to see at
a glance whether RLHF helped.

    report/README.md        the verdict, the evaluation table, each step's before/after, timings, curves
    report/verdict.txt      one line: did the RLHF actor (PPO's, or the --algorithm's) beat the SFT actor?
    report/summary.json     the same numbers for machines
    report/step1_sft.png    SFT loss and perplexity
    report/step2_reward.png reward-model loss and accuracy
    report/step3_rlhf.png   PPO reward, KL, policy and value loss, answer length, held-out score and rule
    report/step3_grpo.png   the same for a critic-free run (`e2e_rlhf.py --algorithm grpo`; one per algorithm)
    report/step2_dpo.png    DPO's loss, rewards/accuracies, rewards/margins, ... (`e2e_rlhf.py --algorithm dpo`)
    report/metrics/         every step's metrics.jsonl
    report/eval_report.*, samples.md   the evaluation (step3_rlhf/evaluate.py)

Rebuild it from the folders at any time: `python -m engine.eval.report OUTPUT_DIR`.
"""
from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path
from typing import Any

from engine.observe.metrics import plot_curves, read_metrics
from engine.runtime.atomic import publish_folder, staging_folder

# Each step's title and the keys of its curves.
STEPS = {
    "step1_sft": ("Step 1: SFT", ["train/loss", "eval/loss", "eval/perplexity"]),
    "step2_reward": ("Step 2: reward model", ["train/loss", "eval/reward_accuracy", "eval/score_margin"]),
    # DPO in place of steps 2 + 3 (`e2e_rlhf.py --algorithm dpo`), with TRL's metric names.
    "step2_dpo": ("Step 2: DPO", ["train/loss", "rewards/accuracies", "rewards/margins", "rewards/chosen",
                                  "rewards/rejected", "logps/chosen", "logps/rejected", "eval/rewards/accuracies",
                                  "eval/rewards/margins"]),
    "step3_rlhf": ("Step 3: PPO RLHF", ["rollout/score_mean", "rollout/kl", "ppo/policy_loss", "ppo/value_loss",
                                        "rollout/response_len", "eval/score_mean", "eval/rule_success"]),
}
# What each step's before -> after row shows (the evaluation key it logs before and after training).
SHOWN = {"step1_sft": ["eval/loss", "eval/perplexity"],
         "step2_reward": ["eval/reward_accuracy", "eval/score_margin"],
         "step2_dpo": ["eval/loss", "eval/rewards/accuracies", "eval/rewards/margins"],
         "step3_rlhf": ["eval/score_mean", "eval/rule_success", "eval/response_len"]}
DPO_FOLDER = "step2_dpo"  # the folder of `e2e_rlhf.py --algorithm dpo`'s step 2, which replaces steps 2 + 3
EVAL_FILES = ("eval_report.json", "eval_report.md", "samples.md")
# A critic-free step 3 (`e2e_rlhf.py --algorithm grpo`, ...): rule reward, no critic, no value loss.
CRITIC_FREE_KEYS = ["rollout/reward_mean", "rollout/frac_reward_zero_std", "ppo/policy_loss", "ppo/entropy",
                    "rollout/response_len", "eval/rule_success"]


def step3_folder(algorithm: str) -> str:
    """The pipeline's step-3 folder of an algorithm: step3_rlhf for PPO (DeepSpeed-Chat's name), else
    step3_<estimator>, so that a GRPO run keeps the PPO run's actor to compare with."""
    return "step3_rlhf" if algorithm == "ppo" else f"step3_{algorithm}"


def trained_folder(algorithm: str) -> str:
    """The pipeline folder of the step that trains the actor with `algorithm`: step2_dpo for DPO (which replaces
    steps 2 + 3), else step 3's."""
    return DPO_FOLDER if algorithm == "dpo" else step3_folder(algorithm)


def actor_path(out: Path, algorithm: str) -> Path:
    """The actor `algorithm` trained under `out`: DPO's folder is the model itself, step 3's holds actor/."""
    folder = out / trained_folder(algorithm)
    return folder if algorithm == "dpo" else folder / "actor"


def step_folders(out: Path) -> dict[str, tuple[str, list[str], list[str]]]:
    """{folder: (title, curve keys, before -> after keys)} of the steps a report shows: the fixed ones (DPO's
    among them) and every critic-free step-3 folder under `out`."""
    folders = {name: (title, keys, SHOWN[name]) for name, (title, keys) in STEPS.items()}
    for path in sorted(out.glob("step3_*")):
        if path.name not in folders and (path / "metrics.jsonl").is_file():
            title = f"Step 3: {path.name.removeprefix('step3_').upper()}"
            folders[path.name] = (title, CRITIC_FREE_KEYS, ["eval/rule_success", "eval/response_len"])
    return folders


def verdict(models: dict[str, dict[str, float]], baseline: str = "sft", candidate: str = "rlhf"
            ) -> tuple[bool | None, str]:
    """(did `candidate` beat `baseline`, one line saying by how much) from eval_report.json's "models".

    Beating means a higher mean reward-model score (when a reward model scored) and, where the rule is
    defined, a higher rule success rate. None when either model is missing or there is nothing to compare."""
    if baseline not in models or candidate not in models:
        return None, f"no evaluation of both {baseline} and {candidate}"
    base, cand = models[baseline], models[candidate]
    parts, checks = [], []
    for key, name in (("score_mean", "reward score"), ("rule_success_rate", "rule success")):
        if key in base and key in cand:
            parts.append(f"{name} {base[key]:.3f} -> {cand[key]:.3f} ({cand[key] - base[key]:+.3f})")
            checks.append(cand[key] > base[key])
    if not checks:
        return None, f"no reward-model score or rule success to compare {candidate} with {baseline}"
    better = all(checks)
    win = f"win rate vs {baseline} {cand['win_rate_vs_first']:.3f}, " if "win_rate_vs_first" in cand else ""
    parts.append(f"{win}KL to reference {cand['kl_to_ref']:.3f}")
    head = f"{candidate.upper()} {'beat' if better else 'did NOT beat'} {baseline.upper()}"
    return better, f"{head}: " + "; ".join(parts)


def before_after(rows: list[dict[str, Any]], keys: list[str]) -> dict[str, tuple[float, float]]:
    """{key: (first logged value, last logged value)} for the keys that were logged at least once."""
    out = {}
    for key in keys:
        values = [r[key] for r in rows if r.get(key) is not None]
        if values:
            out[key] = (values[0], values[-1])
    return out


def build_report(out: Path, pipeline: dict[str, Any] | None = None) -> Path:
    """Write <out>/report from the step folders and <out>/eval (what exists of them); returns its path.
    `pipeline` (command, deployment, seconds per stage) defaults to what the previous report recorded.

    Built in a staging folder and moved into place, so a report is never half-written."""
    out = Path(out)
    final = out / "report"
    if pipeline is None:
        previous = final / "summary.json"
        pipeline = json.loads(previous.read_text()).get("pipeline", {}) if previous.is_file() else {}
    with staging_folder(final) as stage:
        summary = _write(out, stage, pipeline)
        (stage / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        publish_folder(stage, final, model=False)
    return final


def _write(out: Path, stage: Path, pipeline: dict[str, Any]) -> dict[str, Any]:
    summary: dict[str, Any] = {"pipeline": pipeline, "steps": {}}
    md = ["# Pipeline report", ""]
    if pipeline.get("command"):
        md += [f"Command: `{pipeline['command']}`" + (f" (deployment: {pipeline['deployment']})"
                                                       if pipeline.get("deployment") else ""), ""]

    report = out / "eval" / "eval_report.json"
    if report.is_file():
        for name in EVAL_FILES:
            if (out / "eval" / name).is_file():
                shutil.copy2(out / "eval" / name, stage / name)
        evaluation = json.loads(report.read_text())
        beat, line = verdict(evaluation["models"], candidate=pipeline.get("candidate", "rlhf"))
        summary |= {"evaluation": evaluation, "rlhf_beat_sft": beat, "verdict": line}
        (stage / "verdict.txt").write_text(line + "\n")
        md += ["## Verdict", "", f"**{line}**", "", f"Held-out prompts: {evaluation['prompts']}, answers "
               f"{'sampled' if evaluation['decoding'].get('do_sample') else 'greedy'} (seed {evaluation['seed']}); "
               "see [samples.md](samples.md) for answers side by side.", "",
               (out / "eval" / "eval_report.md").read_text().split("\n\n", 1)[-1].strip(), ""]

    rows_md = []
    folders = step_folders(out)
    for folder, (title, keys, shown) in folders.items():
        metrics = out / folder / "metrics.jsonl"
        if not metrics.is_file():
            continue
        (stage / "metrics").mkdir(exist_ok=True)
        shutil.copy2(metrics, stage / "metrics" / f"{folder}.jsonl")
        rows = read_metrics(metrics)
        changes = before_after(rows, shown)
        summary["steps"][folder] = {"steps": max((r["step"] for r in rows), default=0),
                                    "before_after": {k: list(v) for k, v in changes.items()}}
        if plot_curves(metrics, stage / f"{folder}.png", keys, title=title) is not None:
            summary["steps"][folder]["curves"] = f"{folder}.png"
        shown = "; ".join(f"{k} {a:.4g} -> {b:.4g}" for k, (a, b) in changes.items())
        rows_md.append(f"| {title} | {summary['steps'][folder]['steps']} | {shown} |")
    if rows_md:
        md += ["## Steps (first -> last evaluation)", "", "| step | steps | held-out metrics |", "|---|---|---|",
               *rows_md, ""]
    if pipeline.get("seconds"):
        total = sum(pipeline["seconds"].values())
        md += ["## Time", "", "| stage | seconds |", "|---|---|",
               *(f"| {k} | {v:.0f} |" for k, v in pipeline["seconds"].items()), f"| total | {total:.0f} |", ""]
    curves = [f"![{folders[f][0]}]({c})" for f, s in summary["steps"].items() if (c := s.get("curves"))]
    if curves:
        md += ["## Curves", "", *curves, ""]
    (stage / "README.md").write_text("\n".join(md))
    return summary


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m engine.eval.report OUTPUT_DIR")
    print(build_report(Path(sys.argv[1])) / "README.md")
