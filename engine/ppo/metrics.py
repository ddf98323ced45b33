"""The rollout metrics of a critic-free PPO step, over every answer of the step on all ranks (namespaced keys:
`rollout/...`, `reward/<function>_...`), beside `step3_rlhf.main.rollout_stats`' PPO ones."""
from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from engine.runtime.distributed import DistInfo, all_reduce_max, all_reduce_sum


def critic_free_rollout_stats(per_seq: list[dict[str, torch.Tensor]], extras: list[dict[str, Any]],
                              fn_names: Sequence[str], group_size: int, dist: DistInfo) -> dict[str, float]:
    """Reward mean/std, the share of groups with equal rewards, KL per answer token, answer length max and the
    share truncated, advantage min/max, and each reward function's mean/std (population, over the rows it
    scored). `per_seq`: each generation batch's per-answer stats; `extras`: its estimator stats and function
    values (`PPOTrainer.critic_free_experience`)."""
    cat = {k: torch.cat([s[k] for s in per_seq]).double() for k in ("score", "kl", "response_len", "truncated")}
    groups = [len(s["score"]) / group_size for s in per_seq]
    zero_std = sum(float(e["advantages"].get("frac_reward_zero_std", 0.0)) * g for e, g in zip(extras, groups))
    sums = [float(cat["score"].numel()), float(cat["score"].sum()), float((cat["score"] ** 2).sum()),
            float(cat["kl"].sum()), float(cat["response_len"].sum()), float(cat["truncated"].sum()),
            sum(groups), zero_std]
    values = [e["fn_values"] for e in extras if e["fn_values"] is not None]
    fn = torch.cat(values).double() if values else torch.zeros(0, len(fn_names), dtype=torch.float64)
    scored = ~fn.isnan()
    clean = torch.where(scored, fn, 0.0)
    for f in range(len(fn_names)):
        sums += [float(scored[:, f].sum()), float(clean[:, f].sum()), float((clean[:, f] ** 2).sum())]
    n, total, total_sq, kl, length, truncated, n_groups, flat, *fn_sums = all_reduce_sum(sums, dist.device)
    adv_min = min(float(e["advantages"]["advantage_min"]) for e in extras)
    adv_max = max(float(e["advantages"]["advantage_max"]) for e in extras)
    neg_min, adv_max, len_max = all_reduce_max([-adv_min, adv_max, float(cat["response_len"].max())], dist.device)
    mean = total / n
    row = {"rollout/reward_mean": mean, "rollout/reward_std": max(total_sq / n - mean ** 2, 0.0) ** 0.5,
           "rollout/frac_reward_zero_std": flat / max(n_groups, 1.0), "rollout/kl_per_token": kl / max(length, 1.0),
           "rollout/response_len_max": len_max, "rollout/frac_truncated": truncated / n,
           "rollout/advantage_min": -neg_min, "rollout/advantage_max": adv_max}
    for f, name in enumerate(fn_names):
        count, s, sq = fn_sums[3 * f:3 * f + 3]
        if count:
            row[f"reward/{name}_mean"] = s / count
            row[f"reward/{name}_std"] = max(sq / count - (s / count) ** 2, 0.0) ** 0.5
    return row
