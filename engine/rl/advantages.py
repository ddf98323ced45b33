"""Critic-free advantage estimators (GRPO, Dr. GRPO, RLOO, REINFORCE++, REINFORCE++-baseline, ReMax) as pure
tensor functions in one registry, `ADVANTAGE_ESTIMATORS`, all with the same signature:

    fn(rewards, action_mask, *, group_size=1, token_rewards=None, baselines=None, gamma=1.0,
       std_normalize=True, std_floor=STD_FLOOR, batch_sum=None) -> (advantages (B, A), stats)

Conventions (those of `engine.rl.ppo`): positions are actions, `action_mask` (B, A) is 1 on answer actions.
- `rewards` (B,): one outcome reward per answer; NaN means "no score" (every reward function returned None).
  An unscored answer is left out of every baseline and batch statistic and gets zero advantage.
- Groups: the `group_size` answers of one prompt are consecutive rows (rows g*N .. g*N+N-1). Advantages are
  computed over whole groups, so a group must never be split over ranks or batches.
- `token_rewards` (B, A): per-action rewards added to the outcome, i.e. the KL-in-reward penalty of
  `engine.rl.ppo.kl_rewards`; None: no KL in the reward. As in OpenRLHF, every estimator adds their
  return-to-go (undiscounted except in REINFORCE++) to the outcome advantage.
- `batch_sum`: sums a 1-D tensor of statistics over every rank's part of the batch (None: this part is the
  batch). Only the batch-whitening estimators (REINFORCE++ and its baseline variant) use it; the caller passes an
  all-reduce, so their whitening is over the whole data-parallel batch, not one rank's.
- A group whose scored rewards are all equal (or with fewer than two scored) carries no signal: with a group
  estimator its rows get exactly zero advantage (KL penalty included) and it is counted in
  `frac_reward_zero_std`.

`gae` (PPO's) is not in the registry: it needs the critic's values and returns the critic's targets too,
so PPO keeps its own path, `engine.rl.ppo.compute_rewards` then `engine.rl.ppo.gae`.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from engine.rl.ppo import gae, score_position, whiten

BatchSum = Callable[[torch.Tensor], torch.Tensor]
# The smallest std a group's rewards are divided by: a nearly constant group (rewards differing by float noise)
# must not get huge advantages (NeMo-RL issue 4161: 4000x). verl adds 1e-6, TRL 1e-4; 1e-3 follows NeMo-RL.
STD_FLOOR = 1e-3


def check_groups(batch_size: int, group_size: int) -> None:
    """ValueError unless `batch_size` rows form whole groups of `group_size` >= 2 answers."""
    if group_size < 2:
        raise ValueError(f"group advantage estimators need at least 2 answers per prompt (group size {group_size});"
                         " sample 2 or more per prompt, or use reinforce_pp, remax or gae")
    if batch_size % group_size:
        raise ValueError(f"{batch_size} answers do not form whole groups of {group_size}: the batch must be a "
                         f"multiple of the group size")


def flat_groups(rewards: torch.Tensor, group_size: int) -> torch.Tensor:
    """(G,) bool: the groups whose scored rewards are all equal, or that have fewer than two scored (NaN =
    unscored); rows ordered by group. Such a group has nothing to learn from (DAPO's dynamic sampling drops it)."""
    check_groups(rewards.shape[0], group_size)
    r = rewards.float().view(-1, group_size)
    scored = ~torch.isnan(r)
    highest = torch.where(scored, r, -torch.inf).amax(1)
    lowest = torch.where(scored, r, torch.inf).amin(1)
    return highest <= lowest  # no scored: -inf <= inf; one scored or all equal: highest == lowest


def _group_moments(rewards: torch.Tensor, group_size: int) -> tuple[torch.Tensor, ...]:
    """Per row (B,): its group's mean and unbiased std over the scored rewards, and its scored count; and
    whether the row has signal (scored, in a group that is not flat)."""
    r = rewards.float().view(-1, group_size)
    scored = ~torch.isnan(r)
    r = torch.where(scored, r, 0.0)
    n = scored.sum(1, keepdim=True).float()
    mean = r.sum(1, keepdim=True) / n.clamp(min=1)
    var = (((r - mean) * scored) ** 2).sum(1, keepdim=True) / (n - 1).clamp(min=1)
    live = scored & ~flat_groups(rewards, group_size).unsqueeze(1)
    expand = lambda x: x.expand_as(r).reshape(-1)
    return expand(mean), expand(var.sqrt()), expand(n), live.reshape(-1)


def _returns(rewards: torch.Tensor, action_mask: torch.Tensor, gamma: float) -> torch.Tensor:
    """Return-to-go over the answer actions: G_t = sum_{k >= t} gamma^(k - t) r_k (GAE with V = 0, lambda = 1)."""
    rewards = rewards.float()
    return gae(rewards, torch.zeros_like(rewards), action_mask, gamma, 1.0)[0]


def _at_last_action(outcome: torch.Tensor, action_mask: torch.Tensor) -> torch.Tensor:
    """(B, A) zeros with `outcome` (B,) on each answer's last action (`score_position`)."""
    out = torch.zeros(action_mask.shape, dtype=torch.float32, device=action_mask.device)
    rows = torch.arange(out.shape[0], device=out.device)
    out[rows, score_position(action_mask)] = outcome.float()
    return out * action_mask


def _finish(advantages: torch.Tensor, rewards: torch.Tensor, action_mask: torch.Tensor, live: torch.Tensor,
            group_size: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Zero the rows without signal and outside the mask; the stats every estimator reports."""
    mask = action_mask.bool() & live.unsqueeze(1)
    advantages = torch.where(mask, advantages, 0.0).detach()
    scored, answer = rewards[~torch.isnan(rewards)].float(), advantages[mask]
    zero = advantages.new_zeros(())
    stats = {"reward_mean": scored.mean() if scored.numel() else zero,
             "reward_std": scored.std() if scored.numel() > 1 else zero,
             "frac_no_score": torch.isnan(rewards).float().mean(),
             "advantage_min": answer.min() if answer.numel() else zero,
             "advantage_max": answer.max() if answer.numel() else zero}
    if group_size > 1:
        stats["frac_reward_zero_std"] = flat_groups(rewards, group_size).float().mean()
    return advantages, stats


def _outcome_plus_kl(outcome: torch.Tensor, action_mask: torch.Tensor, token_rewards: torch.Tensor | None,
                     gamma: float) -> torch.Tensor:
    """The outcome advantage (B,) on every answer action, plus the return-to-go of the token rewards."""
    advantages = outcome.float().unsqueeze(1) * action_mask
    if token_rewards is not None:
        advantages = advantages + _returns(token_rewards, action_mask, gamma)
    return advantages


def grpo(rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int = 1,
         token_rewards: torch.Tensor | None = None, baselines: torch.Tensor | None = None, gamma: float = 1.0,
         std_normalize: bool = True, std_floor: float = STD_FLOOR,
         batch_sum: BatchSum | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO: A_i = (r_i - mean_g) / max(std_g, std_floor) (unbiased std over the group's scored rewards), on every
    answer action; `std_normalize=False` keeps r_i - mean_g (Dr. GRPO). `baselines` and `gamma` are unused."""
    check_groups(rewards.shape[0], group_size)
    mean, std, _, live = _group_moments(rewards, group_size)
    outcome = rewards.float() - mean
    if std_normalize:
        outcome = outcome / std.clamp(min=std_floor)
    return _finish(_outcome_plus_kl(outcome, action_mask, token_rewards, 1.0), rewards, action_mask, live, group_size)


def dr_grpo(rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int = 1,
            token_rewards: torch.Tensor | None = None, baselines: torch.Tensor | None = None, gamma: float = 1.0,
            std_normalize: bool = True, std_floor: float = STD_FLOOR,
            batch_sum: BatchSum | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dr. GRPO (Liu et al. 2025): A_i = r_i - mean_g, never divided by the std (`std_normalize` is ignored).
    Its other half is the constant loss normaliser, `seq-mean-token-sum-norm` in `engine.rl.losses`."""
    return grpo(rewards, action_mask, group_size=group_size, token_rewards=token_rewards, std_normalize=False)


def rloo(rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int = 1,
         token_rewards: torch.Tensor | None = None, baselines: torch.Tensor | None = None, gamma: float = 1.0,
         std_normalize: bool = True, std_floor: float = STD_FLOOR,
         batch_sum: BatchSum | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """RLOO: A_i = r_i - mean of the other scored answers of the group = n / (n - 1) * (r_i - mean_g), n the
    group's scored count. `baselines`, `gamma`, `std_normalize` and `std_floor` are unused."""
    check_groups(rewards.shape[0], group_size)
    mean, _, n, live = _group_moments(rewards, group_size)
    outcome = n / (n - 1).clamp(min=1) * (rewards.float() - mean)
    return _finish(_outcome_plus_kl(outcome, action_mask, token_rewards, 1.0), rewards, action_mask, live, group_size)


def _whitened_returns(outcome: torch.Tensor, action_mask: torch.Tensor, token_rewards: torch.Tensor | None,
                      gamma: float, live: torch.Tensor, batch_sum: BatchSum | None) -> torch.Tensor:
    """REINFORCE++'s advantage: the discounted return of (outcome on the last action + token rewards), whitened
    over the answer actions of the rows with signal in the whole batch (unbiased variance, as verl), on all
    ranks when `batch_sum` sums over them."""
    rewards = _at_last_action(torch.where(live, outcome.float(), 0.0), action_mask)
    if token_rewards is not None:
        rewards = rewards + token_rewards.float() * action_mask
    mask = action_mask * live.unsqueeze(1)
    returns = _returns(rewards, action_mask, gamma)
    if batch_sum is None:
        return whiten(returns, mask)
    # Count, sum and sum of squares (float64: the difference below cancels) over every rank's part.
    local = torch.stack([mask.sum(), (returns * mask).sum(), (returns ** 2 * mask).sum()]).double()
    n, total, total_sq = batch_sum(local).tolist()
    mean = total / max(n, 1.0)
    var = max(total_sq - n * mean ** 2, 0.0) / max(n - 1.0, 1.0)
    return (returns - mean) * (var + 1e-8) ** -0.5


def reinforce_pp(rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int = 1,
                 token_rewards: torch.Tensor | None = None, baselines: torch.Tensor | None = None, gamma: float = 1.0,
                 std_normalize: bool = True, std_floor: float = STD_FLOOR, batch_sum: BatchSum | None = None
                 ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE++ (Hu 2025): whitened discounted returns, no group needed (any `group_size` that divides the
    batch; with >= 2 it only reports `frac_reward_zero_std`). `baselines`, `std_normalize`, `std_floor` unused;
    the whitening is over every rank's part when `batch_sum` sums over them."""
    live = ~torch.isnan(rewards)
    advantages = _whitened_returns(rewards, action_mask, token_rewards, gamma, live, batch_sum)
    return _finish(advantages, rewards, action_mask, live, group_size)


def reinforce_pp_baseline(rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int = 1,
                          token_rewards: torch.Tensor | None = None, baselines: torch.Tensor | None = None,
                          gamma: float = 1.0, std_normalize: bool = True, std_floor: float = STD_FLOOR,
                          batch_sum: BatchSum | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """REINFORCE++-baseline: r_i - mean_g, then REINFORCE++'s returns and batch whitening (over the rows with
    signal: flat groups are left out and get zero; on every rank's part when `batch_sum` sums over them).
    `baselines`, `std_normalize`, `std_floor` unused."""
    check_groups(rewards.shape[0], group_size)
    mean, _, _, live = _group_moments(rewards, group_size)
    advantages = _whitened_returns(rewards.float() - mean, action_mask, token_rewards, gamma, live, batch_sum)
    return _finish(advantages, rewards, action_mask, live, group_size)


def remax(rewards: torch.Tensor, action_mask: torch.Tensor, *, group_size: int = 1,
          token_rewards: torch.Tensor | None = None, baselines: torch.Tensor | None = None, gamma: float = 1.0,
          std_normalize: bool = True, std_floor: float = STD_FLOOR,
          batch_sum: BatchSum | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """ReMax (Li et al. 2023): A_t = (r + return-to-go of the token rewards) - b, with `baselines` (B,) b = the
    reward of the greedy answer to the same prompt (NaN: no score, the row gets zero). Undiscounted, as verl
    (`gamma` unused); `std_normalize`, `std_floor` unused."""
    if baselines is None:
        raise ValueError("remax needs `baselines`: the reward of the greedy answer to each row's prompt")
    live = ~torch.isnan(rewards) & ~torch.isnan(baselines)
    outcome = torch.where(live, rewards.float() - baselines.float(), 0.0)
    return _finish(_outcome_plus_kl(outcome, action_mask, token_rewards, 1.0), rewards, action_mask, live, group_size)


AdvantageFn = Callable[..., tuple[torch.Tensor, dict[str, torch.Tensor]]]
ADVANTAGE_ESTIMATORS: dict[str, AdvantageFn] = {
    "grpo": grpo, "dr_grpo": dr_grpo, "rloo": rloo, "reinforce_pp": reinforce_pp,
    "reinforce_pp_baseline": reinforce_pp_baseline, "remax": remax,
}
# Those that need >= 2 answers per prompt (check_groups refuses fewer); remax needs greedy baselines.
GROUP_ESTIMATORS = frozenset({"grpo", "dr_grpo", "rloo", "reinforce_pp_baseline"})
NEEDS_BASELINES = frozenset({"remax"})
# Every value of --advantage_estimator: PPO's gae (with a critic) and the critic-free ones.
ESTIMATOR_NAMES = ("gae", *ADVANTAGE_ESTIMATORS)


def get_estimator(name: str) -> AdvantageFn:
    """The critic-free estimator called `name`; ValueError naming the choices otherwise (gae is PPO's path)."""
    if name not in ADVANTAGE_ESTIMATORS:
        hint = " (gae is PPO's: engine.rl.ppo.gae, with a critic)" if name == "gae" else ""
        raise ValueError(f"unknown critic-free advantage estimator {name!r}{hint}; "
                         f"choose one of {', '.join(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]
