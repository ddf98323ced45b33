"""The step-3 benchmark's report math (benchmarks/rlhf_step.py): pure functions over the per-PPO-step
rows step 3 writes to metrics.jsonl, plus the Markdown of one report and of an A/B comparison.

Standard library only. Definitions (every sum is over the measured PPO steps, after the warm-up ones):
- samples/s: DeepSpeed-Chat's `perf/samples_per_s` (global), time-weighted: sum(samples) / sum(e2e); its
  samples are rollout rows x ppo_epochs (x 2 with PTX).
- time per trained sample: sum(e2e) / (steps x the rollout rows one PPO step trains on, all ranks: prompts
  x --n_samples_per_prompt x generation_batches), each row counted once however many PPO epochs see it;
  the figure that compares PPO (1 answer per prompt) with critic-free estimators (N answers per prompt).
- generation tokens/s: answer tokens generated on all ranks (`rollout/sequences` x `rollout/response_len`)
  / rank 0's generation seconds.
- training tokens/s: the padded tokens the PPO updates run through, sequences x ppo_epochs x
  (max_prompt_seq_len + max_answer_seq_len), the width the TFLOPs formula counts / training seconds.
- TFLOPs (per device): sum(TFLOPs x seconds) / sum(seconds) of the phase, i.e. total FLOPs / total time;
  MFU = TFLOPs / the device's peak dense TFLOPs (null when the peak is unknown).
- decode step: `perf/gen_token_latency_s` (seconds of one generation batch per answer token, the mean
  answer length over all ranks: above the time of one decode step when answers end before the batch's
  widest); its HBM roofline is the time to read the actor's weights once, bytes / bandwidth, and the
  ratio step / roofline says how far decoding is from bandwidth-bound (1.0 = at the roofline).
- memory: the largest per-phase peak over all steps (warm-up included: a run must fit its first step
  too); on CPU the peak is the process RSS, so growth = peak - `memory/baseline_gb` is what the run added.
- planner error: (predicted - measured) / measured.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

PHASES = ("generate", "experience", "train")
ROLE_CATEGORIES = ("parameters", "gradients", "buffers", "optimizer")
GIB = 2**30

# Dense bf16/fp16 tensor-core peaks (NVIDIA data sheets, SXM): H100 and H200 share the compute die.
PEAK_TFLOPS_16BIT = {"H100": 989.0, "H200": 989.0}
# HBM bandwidth, GB/s (H200 SXM: 4.8 TB/s HBM3e).
HBM_GB_S = {"H200": 4800.0}


def default_peak_tflops(device_name: str, dtype: str) -> float | None:
    """The device's dense 16-bit peak when its name is known and the run is bf16/fp16, else None."""
    if dtype not in ("bf16", "fp16"):
        return None
    return next((peak for key, peak in PEAK_TFLOPS_16BIT.items() if key in device_name.upper()), None)


def default_hbm_gb_s(device_name: str) -> float | None:
    return next((bw for key, bw in HBM_GB_S.items() if key in device_name.upper()), None)


def rate(amount: float, seconds: float) -> float:
    """amount / seconds (tokens/s, samples/s); seconds must be > 0."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds}")
    return amount / seconds


def mfu(tflops: float | None, peak_tflops: float | None) -> float | None:
    """Model FLOPs utilisation: achieved / peak TFLOPs; None without a peak."""
    if tflops is None or peak_tflops is None:
        return None
    if peak_tflops <= 0:
        raise ValueError(f"peak_tflops must be > 0, got {peak_tflops}")
    return tflops / peak_tflops


def roofline_s(param_bytes: float, hbm_gb_s: float | None) -> float | None:
    """Seconds to read `param_bytes` once at `hbm_gb_s` GB/s (1 GB = 1e9 bytes); None without a bandwidth."""
    if hbm_gb_s is None:
        return None
    if hbm_gb_s <= 0:
        raise ValueError(f"hbm_gb_s must be > 0, got {hbm_gb_s}")
    return param_bytes / (hbm_gb_s * 1e9)


def roofline_ratio(decode_step_s: float, param_bytes: float, hbm_gb_s: float | None) -> float | None:
    """Measured decode step time over its HBM roofline (>= 1 on real hardware); None without a bandwidth."""
    floor = roofline_s(param_bytes, hbm_gb_s)
    return None if floor is None else decode_step_s / floor


def relative_error(predicted: float | None, measured: float | None) -> float | None:
    """(predicted - measured) / measured; None when either is missing or measured is 0."""
    if predicted is None or measured is None or measured == 0:
        return None
    return (predicted - measured) / measured


def time_split(seconds: Mapping[str, float]) -> dict[str, float]:
    """Each phase's share of the phases' total time (they sum to 1)."""
    total = sum(seconds.values())
    if total <= 0:
        raise ValueError("the phase times sum to 0")
    return {phase: value / total for phase, value in seconds.items()}


def weighted_mean(values: Sequence[float], weights: Sequence[float]) -> float:
    """sum(v * w) / sum(w): a rate averaged over steps of different length (w = each step's seconds)."""
    total = sum(weights)
    if total <= 0:
        raise ValueError("the weights sum to 0")
    return sum(v * w for v, w in zip(values, weights)) / total


def measured_steps(rows: Iterable[Mapping[str, Any]], warmup_steps: int) -> list[Mapping[str, Any]]:
    """The PPO-step rows (those with `perf/e2e_s`) after the first `warmup_steps`, in step order."""
    steps = sorted((r for r in rows if r.get("perf/e2e_s") is not None), key=lambda r: r["step"])
    return steps[warmup_steps:]


def throughput(steps: Sequence[Mapping[str, Any]], *, seq_length: int, ppo_epochs: int,
               peak_tflops: float | None, trained_samples_per_step: int | None = None) -> dict[str, Any]:
    """Rates over the measured steps (see the module docstring); the time per trained sample is None
    without `trained_samples_per_step` (rollout rows per PPO step, all ranks)."""
    if not steps:
        raise ValueError("no measured PPO steps")
    col = lambda key: [float(r[key]) for r in steps]  # noqa: E731
    gen_s, train_s, e2e_s = col("timing/generate_s"), col("timing/train_s"), col("perf/e2e_s")
    sequences = col("rollout/sequences")
    answer_tokens = sum(n * length for n, length in zip(sequences, col("rollout/response_len")))
    out: dict[str, Any] = {
        "samples_per_s": weighted_mean(col("perf/samples_per_s"), e2e_s),
        "gen_tokens_per_s": rate(answer_tokens, sum(gen_s)),
        "answer_tokens_mean": answer_tokens / sum(sequences),
        "train_tokens_per_s": rate(sum(sequences) * ppo_epochs * seq_length, sum(train_s)),
        "train_tflops": weighted_mean(col("perf/train_tflops"), train_s),
        "gen_tflops": weighted_mean(col("perf/gen_tflops"), gen_s),
        "total_tflops": weighted_mean(col("perf/total_tflops"), e2e_s),
        "peak_tflops": peak_tflops,
        "trained_samples_per_step": trained_samples_per_step,
        "s_per_trained_sample": (None if trained_samples_per_step is None
                                 else sum(e2e_s) / (len(steps) * trained_samples_per_step)),
    }
    out["mfu"] = None if peak_tflops is None else {
        phase: mfu(out[f"{phase}_tflops"], peak_tflops) for phase in ("train", "gen", "total")}
    return out


def phase_times(steps: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Mean seconds per PPO step of each phase and their fractions."""
    means = {phase: sum(float(r[f"timing/{phase}_s"]) for r in steps) / len(steps) for phase in PHASES}
    return {"seconds": means, "e2e_s": sum(means.values()), "fractions": time_split(means)}


def step_seconds(step: Mapping[str, Any]) -> float:
    """Seconds of one PPO step: the sum of its phases."""
    return sum(float(step[f"timing/{phase}_s"]) for phase in PHASES)


def decode(steps: Sequence[Mapping[str, Any]], actor_param_bytes: float, hbm_gb_s: float | None) -> dict[str, Any]:
    step_s = sum(float(r["perf/gen_token_latency_s"]) for r in steps) / len(steps)
    return {"step_s": step_s, "actor_param_bytes": actor_param_bytes, "hbm_gb_s": hbm_gb_s,
            "roofline_s": roofline_s(actor_param_bytes, hbm_gb_s),
            "roofline_ratio": roofline_ratio(step_s, actor_param_bytes, hbm_gb_s)}


def memory_peaks(all_steps: Sequence[Mapping[str, Any]], baseline_gb: float | None, on_cpu: bool) -> dict[str, Any]:
    """Largest peak of each phase over `all_steps` (GB per rank) and, on CPU, its growth over the baseline."""
    peaks = {phase: max(float(r[f"memory/{phase}_peak_gb"]) for r in all_steps) for phase in PHASES}
    growth = ({phase: peak - baseline_gb for phase, peak in peaks.items()}
              if on_cpu and baseline_gb is not None else None)
    return {"baseline_gb": baseline_gb, "peak_gb": peaks, "growth_gb": growth,
            "current_gb": float(all_steps[-1]["memory/current_gb"])}


def role_gb(role_bytes: Mapping[str, Mapping[str, Mapping[str, int]]]) -> dict[str, Any]:
    """{role: {category: {"gpu", "cpu"} bytes}} -> the same in GB, with a "total" per role and category."""
    out: dict[str, Any] = {}
    for role, categories in role_bytes.items():
        out[role] = {c: {kind: v / GIB for kind, v in categories[c].items()} for c in ROLE_CATEGORIES}
        out[role]["total"] = {kind: sum(out[role][c][kind] for c in ROLE_CATEGORIES) for kind in ("gpu", "cpu")}
    return out


def model_states_gb(roles_gb: Mapping[str, Any]) -> float:
    """Model states of every role on this rank, GB, accelerator + host: the figure the estimators compare."""
    return sum(cats["total"]["gpu"] + cats["total"]["cpu"] for cats in roles_gb.values())


def planner_errors(planner: Mapping[str, Any], measured_peaks: Mapping[str, float] | None,
                   measured_roles: Mapping[str, Any], on_cpu: bool) -> dict[str, Any]:
    """Relative error of the planner's phase peaks and role states against the measured ones. On CPU the
    planner's device + host bytes are compared with measured growth over baseline and with gpu + cpu bytes;
    on a GPU with the device peak and the gpu bytes."""
    peaks = {phase: relative_error(planner.get("peak_gb", {}).get(phase), (measured_peaks or {}).get(phase))
             for phase in PHASES}
    roles: dict[str, dict[str, float | None]] = {}
    for role, predicted in planner.get("roles", {}).items():
        measured = measured_roles.get(role)
        if measured is None:
            continue
        roles[role] = {c: relative_error(predicted.get(c), measured[c]["gpu"] + (measured[c]["cpu"] if on_cpu else 0.0))
                       for c in ROLE_CATEGORIES if c in predicted}
    return {"peak_gb": peaks, "roles": roles}


# ---------------------------------------------------------------------------------------------- Markdown
def _fmt(value: Any) -> str:
    """3 significant digits; thousands with separators; None as n/a."""
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:+.1f}%"


def markdown_report(report: Mapping[str, Any]) -> str:
    """One benchmark report as Markdown tables."""
    cfg, tp, times, dec, mem = (report[k] for k in ("config", "throughput", "time", "decode", "memory"))
    lines = [*_header(report), "", "| throughput | value |", "|---|---|",
             f"| samples/s (global) | {_fmt(tp['samples_per_s'])} |",
             f"| s per trained sample ({_fmt(tp.get('trained_samples_per_step'))} per PPO step) | "
             f"{_fmt(tp.get('s_per_trained_sample'))} |",
             f"| generation tokens/s (global) | {_fmt(tp['gen_tokens_per_s'])} |",
             f"| training tokens/s (global, padded) | {_fmt(tp['train_tokens_per_s'])} |",
             f"| answer tokens per sequence (mean) | {_fmt(tp['answer_tokens_mean'])} |"]
    for phase in ("train", "gen", "total"):
        util = f" (MFU {100 * tp['mfu'][phase]:.1f}%)" if tp.get("mfu") else ""
        lines.append(f"| {phase} TFLOPs per device | {_fmt(tp[f'{phase}_tflops'])}{util} |")
    lines.append(f"| decode step | {_fmt(dec['step_s'])} s (roofline {_fmt(dec['roofline_s'])} s, "
                 f"ratio {_fmt(dec['roofline_ratio'])}) |")
    start = report.get("startup")
    if start:  # reports written before the startup figures existed have none
        per_rank = {k: ", ".join(_fmt(v) for v in start[k]) for k in ("launch_to_first_step_s", "peak_rss_gb")}
        lines += [f"| first PPO step | {_fmt(start['first_step_s'])} s |",
                  f"| launch to end of first step, per rank | {per_rank['launch_to_first_step_s']} s |",
                  f"| peak RSS per rank | {per_rank['peak_rss_gb']} GB |"]
    lines += ["", "| phase | s per PPO step | share | peak GB per rank | growth over baseline GB |",
              "|---|---|---|---|---|"]
    for phase in PHASES:
        growth = mem["growth_gb"][phase] if mem.get("growth_gb") else None
        lines.append(f"| {phase} | {_fmt(times['seconds'][phase])} | {100 * times['fractions'][phase]:.1f}% | "
                     f"{_fmt(mem['peak_gb'][phase])} | {_fmt(growth)} |")
    lines += ["", f"Baseline (process before any model): {_fmt(mem['baseline_gb'])} GB. Model states per rank "
              f"(rank 0), GB, accelerator / host ({_fmt(mem.get('model_states_gb'))} GB in all):", "",
              "| role | parameters | gradients | reduce buckets | optimizer | total |", "|---|---|---|---|---|---|"]
    for role, cats in mem["roles"].items():
        cells = " | ".join(f"{_fmt(cats[c]['gpu'])} / {_fmt(cats[c]['cpu'])}" for c in (*ROLE_CATEGORIES, "total"))
        lines.append(f"| {role} | {cells} |")
    lines += ["", _planner_markdown(report.get("planner"), report.get("planner_error"), report.get("planner_note"),
                                    mem["roles"], report["config"]["device"] == "cpu")]
    return "\n".join(lines) + "\n"


def _header(report: Mapping[str, Any]) -> list[str]:
    cfg, steps = report["config"], report["steps"]
    flags = " ".join(cfg["step3_flags"]) or "-"
    return [f"# Step-3 benchmark: {_title(cfg)}", "",
            f"{cfg['world_size']} rank(s) on {cfg['device_name']}, {cfg['dtype']}, prompt {cfg['max_prompt_seq_len']} "
            f"+ answer {cfg['max_answer_seq_len']} tokens, {cfg['per_device_generation_batch_size']} prompts and "
            f"{cfg['per_device_training_batch_size']} per micro-batch per rank; {steps['measured']} PPO steps "
            f"measured after {steps['warmup']} warm-up. Step-3 flags: `{flags}`"]


def _title(cfg: Mapping[str, Any]) -> str:
    """'<actor> actor, <critic> critic' for PPO; the estimator, answers per prompt and scorers otherwise."""
    if "critic" in cfg:
        return f"{cfg['actor']['name']} actor, {cfg['critic']['name']} critic"
    scorers = [f"{cfg['reward']['name']} reward model"] if "reward" in cfg else []
    scorers += [ref.rsplit(":", 1)[-1] for ref in cfg.get("reward_funcs", [])]
    return (f"{cfg['actor']['name']} actor, {cfg.get('advantage_estimator')} x {cfg.get('n_samples_per_prompt')} "
            f"answers per prompt, no critic, scored by {' + '.join(scorers) or 'nothing'}")


def _planner_markdown(planner: Mapping[str, Any] | None, errors: Mapping[str, Any] | None, note: str | None,
                      measured_roles: Mapping[str, Any], on_cpu: bool) -> str:
    if planner is None:
        return f"Planner: not available ({note})."
    errors = errors or {}
    rows = ["Planner prediction per rank (on CPU against the growth over baseline):", "",
            "| phase | planner GB | error vs measured |", "|---|---|---|"]
    for phase in PHASES:
        rows.append(f"| {phase} | {_fmt(planner.get('peak_gb', {}).get(phase))} | "
                    f"{_pct(errors.get('peak_gb', {}).get(phase))} |")
    rows += ["", "| role | state | planner GB | measured GB | error |", "|---|---|---|---|---|"]
    for role, predicted in planner.get("roles", {}).items():
        measured = measured_roles.get(role)
        for category, value in predicted.items():
            got = (measured[category]["gpu"] + (measured[category]["cpu"] if on_cpu else 0.0)
                   if measured is not None and category in measured else None)
            rows.append(f"| {role} | {category} | {_fmt(value)} | {_fmt(got)} | "
                        f"{_pct(errors.get('roles', {}).get(role, {}).get(category))} |")
    return "\n".join(rows)


# Rows of the A/B table: (label, path into the report).
COMPARE_ROWS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("samples/s", ("throughput", "samples_per_s")),
    ("s per trained sample", ("throughput", "s_per_trained_sample")),
    ("generation tokens/s", ("throughput", "gen_tokens_per_s")),
    ("training tokens/s", ("throughput", "train_tokens_per_s")),
    ("train TFLOPs", ("throughput", "train_tflops")),
    ("gen TFLOPs", ("throughput", "gen_tflops")),
    ("total TFLOPs", ("throughput", "total_tflops")),
    ("generate s", ("time", "seconds", "generate")),
    ("experience s", ("time", "seconds", "experience")),
    ("train s", ("time", "seconds", "train")),
    ("PPO step s", ("time", "e2e_s")),
    ("first PPO step s", ("startup", "first_step_s")),
    ("launch to first step s (slowest rank)", ("startup", "launch_to_first_step_s_max")),
    ("peak RSS GB (largest rank)", ("startup", "peak_rss_gb_max")),
    ("decode step s", ("decode", "step_s")),
    ("decode / roofline", ("decode", "roofline_ratio")),
    ("model states GB (all roles)", ("memory", "model_states_gb")),
    ("generate peak GB", ("memory", "peak_gb", "generate")),
    ("experience peak GB", ("memory", "peak_gb", "experience")),
    ("train peak GB", ("memory", "peak_gb", "train")),
    ("generate growth GB", ("memory", "growth_gb", "generate")),
    ("experience growth GB", ("memory", "growth_gb", "experience")),
    ("train growth GB", ("memory", "growth_gb", "train")),
)


def lookup(report: Mapping[str, Any], path: Sequence[str]) -> Any:
    value: Any = report
    for key in path:
        if not isinstance(value, Mapping) or key not in value:
            return None
        value = value[key]
    return value


def ratio(value: float | None, reference: float | None) -> float | None:
    """value / reference; None when either is missing or the reference is 0."""
    if value is None or reference is None or reference == 0:
        return None
    return value / reference


def compare_markdown(reports: Sequence[Mapping[str, Any]], names: Sequence[str]) -> str:
    """An A/B table: one column per report, each value with its ratio to the first report's."""
    if len(reports) < 2:
        raise ValueError("compare needs at least two reports")
    header = "| metric | " + " | ".join(names) + " |"
    lines = ["flags: " + "; ".join(f"{n}: `{' '.join(r['config']['step3_flags']) or '-'}`"
                                    for n, r in zip(names, reports)), "",
             header, "|---|" + "---|" * len(reports)]
    for label, path in COMPARE_ROWS + tuple(_role_rows(reports)):
        values = [lookup(r, path) for r in reports]
        if all(v is None for v in values):
            continue
        cells = [_fmt(values[0])] + [f"{_fmt(v)} ({_ratio_text(ratio(v, values[0]))})" for v in values[1:]]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def compare_json(reports: Sequence[Mapping[str, Any]], names: Sequence[str]) -> dict[str, Any]:
    """The A/B table's figures as JSON: each run's algorithm and roles, then {metric: {run: value}} and the
    same as ratios to the first run (None where a run lacks the figure)."""
    if len(reports) < 2:
        raise ValueError("compare needs at least two reports")
    runs = {n: {"advantage_estimator": r["config"].get("advantage_estimator", "gae"),
                "n_samples_per_prompt": r["config"].get("n_samples_per_prompt", 1),
                "roles": list(lookup(r, ("memory", "roles")) or {}), "step3_flags": r["config"]["step3_flags"]}
            for n, r in zip(names, reports)}
    values: dict[str, dict[str, Any]] = {}
    for label, path in COMPARE_ROWS + tuple(_role_rows(reports)):
        row = {n: lookup(r, path) for n, r in zip(names, reports)}
        if any(v is not None for v in row.values()):
            values[label] = row
    ratios = {label: {n: ratio(v, row[names[0]]) for n, v in row.items()} for label, row in values.items()}
    return {"reference": names[0], "runs": runs, "values": values, "ratios_to_reference": ratios}


def _ratio_text(value: float | None) -> str:
    return "n/a" if value is None or not math.isfinite(value) else f"{value:.2f}x"


def _role_rows(reports: Sequence[Mapping[str, Any]]) -> Iterable[tuple[str, tuple[str, ...]]]:
    roles = dict.fromkeys(role for r in reports for role in lookup(r, ("memory", "roles")) or {})
    for role in roles:
        for kind in ("gpu", "cpu"):
            yield f"{role} states GB ({kind})", ("memory", "roles", role, "total", kind)
