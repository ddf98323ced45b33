"""DPO's loss on a pair batch and its metrics, with TRL's names (`rewards/chosen`, `rewards/accuracies`,
`logps/chosen`, ...) so that dashboards made for TRL's DPOTrainer read them as they are."""
from __future__ import annotations

from typing import Any

import torch

from engine.config import DPOArgs
from engine.dpo.logps import PairLogps, pair_logps
from engine.dpo.reference import Reference
from engine.rl.dpo import LENGTH_NORMALISED, dpo_loss, nll_term
from engine.runtime.distributed import all_reduce_sum
from engine.runtime.run import to_device

# The per-pair quantities summed over a window and all ranks, then divided by the pairs: metric name -> stat.
PAIR_METRICS = {"rewards/chosen": "chosen_rewards", "rewards/rejected": "rejected_rewards",
                "rewards/accuracies": "accuracies", "rewards/margins": "margins",
                "logps/chosen": "policy_chosen", "logps/rejected": "policy_rejected"}
SUM_KEYS = ("loss", "nll_loss", "pairs", "nonfinite", *PAIR_METRICS.values())


def batch_loss(policy: PairLogps, reference: PairLogps | None, dpo: DPOArgs, pair_count: float | None = None
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """The DPO-family loss of one pair batch (+ the NLL term) and its per-pair stats (B,), detached.

    Sums or means per answer by the loss (`engine.rl.dpo.LENGTH_NORMALISED`); `pair_count` as in `dpo_loss`."""
    means = dpo.dpo_loss in LENGTH_NORMALISED
    pc, pr = (policy.chosen_means, policy.rejected_means) if means else (policy.chosen, policy.rejected)
    rc = rr = None
    if reference is not None:
        rc, rr = (reference.chosen_means, reference.rejected_means) if means else (reference.chosen, reference.rejected)
    loss, stats = dpo_loss(pc, pr, rc, rr, loss_type=dpo.dpo_loss, beta=dpo.beta,
                           label_smoothing=dpo.label_smoothing, simpo_gamma=dpo.simpo_gamma, pair_count=pair_count)
    stats |= {"policy_chosen": policy.chosen.detach(), "policy_rejected": policy.rejected.detach()}
    if dpo.nll_coef:
        nll = nll_term(policy.chosen_means, dpo.nll_coef, pair_count)
        stats["nll_loss"] = nll.detach()
        loss = loss + nll
    return loss, stats


class MetricSums:
    """Sums over the micro-batches of a window (or an evaluation) of the loss and the per-pair stats."""

    def __init__(self) -> None:
        self.sums = dict.fromkeys(SUM_KEYS, 0.0)

    def add(self, loss_sum: float, stats: dict[str, torch.Tensor], nll_sum: float = 0.0) -> None:
        """`loss_sum`: the batch's loss summed over its pairs; `stats`: `batch_loss`'s per-pair stats."""
        pairs = stats["accuracies"].numel()
        finite = all(bool(torch.isfinite(stats[k]).all()) for k in PAIR_METRICS.values())
        self.sums["loss"] += loss_sum
        self.sums["nll_loss"] += nll_sum
        self.sums["pairs"] += pairs
        self.sums["nonfinite"] += float(not (finite and torch.isfinite(torch.tensor(loss_sum))))
        for key in PAIR_METRICS.values():
            self.sums[key] += float(stats[key].double().sum())

    def reduce(self, device: torch.device, prefix: str = "") -> tuple[dict[str, float], bool]:
        """(metrics over all ranks: `<prefix>loss`, `<prefix>rewards/chosen`, ..., whether any was not finite)."""
        totals = dict(zip(SUM_KEYS, all_reduce_sum([self.sums[k] for k in SUM_KEYS], device), strict=True))
        pairs = max(totals["pairs"], 1.0)
        row = {f"{prefix}loss": totals["loss"] / pairs}
        row |= {f"{prefix}{name}": totals[key] / pairs for name, key in PAIR_METRICS.items()}
        if totals["nll_loss"]:
            row[f"{prefix}nll_loss"] = totals["nll_loss"] / pairs
        return row, bool(totals["nonfinite"])


@torch.no_grad()
def evaluate(engine: Any, reference: Reference, loader: Any, dpo: DPOArgs, device: torch.device,
             chunk_size: int | None, max_batches: int) -> dict[str, float]:
    """The DPO metrics over at most `max_batches` evaluation batches per rank, all ranks: `eval/loss`,
    `eval/rewards/accuracies`, ..., `eval/pairs`. The policy runs in eval mode (no dropout)."""
    was_training = getattr(engine, "module", engine).training  # DeepSpeed's engine does not set its own
    engine.eval()
    sums = MetricSums()
    for i, batch in enumerate(loader):
        if i >= max_batches:
            break
        batch = to_device(batch, device)
        policy = pair_logps(engine, batch, chunk_size)
        loss, stats = batch_loss(policy, reference.logps(batch, "eval"), dpo, pair_count=1.0)
        sums.add(float(loss), stats, float(stats["nll_loss"].sum()) if "nll_loss" in stats else 0.0)
    engine.train(was_training)
    row, _ = sums.reduce(device, "eval/")
    return row | {"eval/pairs": all_reduce_sum([sums.sums["pairs"]], device)[0]}
