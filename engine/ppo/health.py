"""Health warnings of a PPO run: KL drift, reward-std collapse, ratio explosions, reward hacking by length."""
from __future__ import annotations

# Thresholds of `health_warnings` (the KL bound is a flag, --warn_kl_above).
RATIO_LIMIT = 10.0          # a probability ratio this far from 1 means the policy moved far within one step
STD_COLLAPSE = 0.05         # reward std below this share of the first step's: answers all look alike to the RM
LENGTH_COLLAPSE = 0.5       # answers shorter than half of what they were while the score rises
TREND_WINDOW = 5            # PPO steps per window when comparing trends


def _window_mean(rows: list[dict[str, float]], key: str) -> float:
    return sum(r[key] for r in rows) / len(rows)


def health_warnings(history: list[dict[str, float]], kl_bound: float) -> list[str]:
    """Warnings about the latest PPO step (`history[-1]`) given the steps before it: KL above the bound,
    reward std collapsing, ratio explosions, and reward rising while answers get much shorter."""
    row, out = history[-1], []
    if row["rollout/kl"] > kl_bound:
        out.append(f"KL to the reference is {row['rollout/kl']:.3g} per answer, above --warn_kl_above {kl_bound:g}: "
                   "the actor drifts; raise --kl_ctl, set --target_kl or lower --actor_learning_rate")
    first_std = history[0]["rollout/score_std"]
    if len(history) > 1 and first_std > 0 and row["rollout/score_std"] < STD_COLLAPSE * first_std:
        out.append(f"reward std collapsed to {row['rollout/score_std']:.3g} (first step: {first_std:.3g}): the "
                   "answers look alike to the reward model, so advantages carry little signal")
    if row.get("ppo/ratio_max", 1.0) > RATIO_LIMIT:
        out.append(f"PPO ratio reached {row['ppo/ratio_max']:.3g}: the policy moved far from the one that "
                   "generated; lower --actor_learning_rate, --ppo_epochs or --generation_batches")
    if len(history) >= 2 * TREND_WINDOW:
        before, now = history[-2 * TREND_WINDOW:-TREND_WINDOW], history[-TREND_WINDOW:]
        len_before, len_now = _window_mean(before, "rollout/response_len"), _window_mean(now, "rollout/response_len")
        if (_window_mean(now, "rollout/score_mean") > _window_mean(before, "rollout/score_mean")
                and len_now < LENGTH_COLLAPSE * len_before):
            out.append(f"reward rises while answers shrank from {len_before:.3g} to {len_now:.3g} tokens: possible "
                       "reward hacking through short answers; check the samples (--print_answers)")
    return out
