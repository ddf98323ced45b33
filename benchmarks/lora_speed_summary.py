"""Summary of benchmarks/lora_speed.sh's reports: medians over rounds, and LoRA's ratio to no LoRA.

    python benchmarks/lora_speed_summary.py OUT_DIR     # writes OUT_DIR/summary.json and summary.md

Reports are named <variant>_r<round>_h<hybrid>_l<lora>.json. Each (variant, hybrid, lora) gets the median
over rounds of the per-phase seconds per PPO step (means over the measured steps), the first step, launch to
the end of the first step (slowest rank) and the peak RSS (largest rank); `ratios` divides each LoRA run's figures
by the same variant's no-LoRA run with the same hybrid setting (issue 18's goals: step <= 1.1x, launch <= 1.2x).
`step_median_s` is each run's median step instead of its mean: a burst of load from another job on a shared
machine moves a run's mean, and much less its median.
"""
from __future__ import annotations

import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

NAME = re.compile(r"^(?P<variant>.+)_r(?P<round>\d+)_h(?P<hybrid>[01])_l(?P<lora>\d+)$")
FIGURES = {  # label -> path in a report
    "generate_s": ("time", "seconds", "generate"), "experience_s": ("time", "seconds", "experience"),
    "train_s": ("time", "seconds", "train"), "step_s": ("time", "e2e_s"),
    "first_step_s": ("startup", "first_step_s"),
    "launch_to_first_step_s": ("startup", "launch_to_first_step_s_max"),
    "peak_rss_gb": ("startup", "peak_rss_gb_max"),
}
GOALS = {"step_s": 1.1, "launch_to_first_step_s": 1.2}


def _lookup(report: dict[str, Any], path: tuple[str, ...]) -> float:
    value: Any = report
    for key in path:
        value = value[key]
    return float(value)


def _figures(report: dict[str, Any]) -> dict[str, float]:
    steps = [row["perf/e2e_s"] for row in report["per_step"] if "perf/e2e_s" in row][report["steps"]["warmup"]:]
    return {**{k: _lookup(report, p) for k, p in FIGURES.items()}, "step_median_s": statistics.median(steps)}


def summarize(out: Path) -> dict[str, Any]:
    groups: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
    for path in sorted(out.glob("*.json")):
        match = NAME.match(path.stem)
        if match:
            key = (match["variant"], int(match["hybrid"]), int(match["lora"]))
            groups.setdefault(key, []).append(json.loads(path.read_text()))
    if not groups:
        sys.exit(f"no <variant>_r<round>_h<hybrid>_l<lora>.json reports in {out}")
    runs = {}
    for (variant, hybrid, lora), reports in sorted(groups.items()):
        figures = [_figures(r) for r in reports]
        runs[f"{variant} hybrid={hybrid} lora={lora}"] = {
            "variant": variant, "hybrid": hybrid, "lora": lora, "rounds": len(reports),
            **{k: statistics.median(f[k] for f in figures) for k in figures[0]}}
    ratios = {}
    for name, run in runs.items():
        base = runs.get(f"{run['variant']} hybrid={run['hybrid']} lora=0")
        if run["lora"] and base:
            ratios[name] = {k: run[k] / base[k] for k in (*FIGURES, "step_median_s")} | {
                f"meets_{k}": run[k] / base[k] <= goal for k, goal in GOALS.items()}
    first = next(iter(groups.values()))[0]["config"]
    return {"versions": first["versions"], "device_name": first["device_name"], "runs": runs,
            "lora_over_no_lora": ratios}


def markdown(summary: dict[str, Any]) -> str:
    lines = ["| run | generate s | experience s | train s | step s | step s, median | first step s "
             "| launch to first step s | peak RSS GB | LoRA/no-LoRA step | LoRA/no-LoRA step, median "
             "| LoRA/no-LoRA launch |", "|---|" + "---|" * 11]
    for name, run in summary["runs"].items():
        ratio = summary["lora_over_no_lora"].get(name, {})
        cells = [f"{run[k]:.3f}" for k in ("generate_s", "experience_s", "train_s", "step_s", "step_median_s",
                                           "first_step_s", "launch_to_first_step_s", "peak_rss_gb")]
        cells += [f"{ratio[k]:.2f}x" if k in ratio else "" for k in ("step_s", "step_median_s",
                                                                     "launch_to_first_step_s")]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    if len(sys.argv) != 2:
        sys.exit(__doc__)
    out = Path(sys.argv[1])
    summary = summarize(out)
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out / "summary.md").write_text(markdown(summary))
    print(markdown(summary), end="")


if __name__ == "__main__":
    main()
