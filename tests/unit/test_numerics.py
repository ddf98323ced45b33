"""Hand-worked sequences of good and bad steps through `BadStepGuard`, the fp16 overflow accounting on a
fake DeepSpeed engine (fp16 cannot run on a CPU), and --normalize_reward's moments ignoring a NaN batch."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from engine.errors import UserError
from engine.runtime.bad_steps import BadStepGuard, optimizer_metrics

GOOD = {"nonfinite": False, "skipped": False}
NAN = {"nonfinite": True, "skipped": False}
SKIP = {"nonfinite": False, "skipped": True}


def run(guard: BadStepGuard, steps: list[dict]) -> list[int]:
    """Record and check each step in turn, as the loops do; returns the logged bad_steps counts."""
    counts = []
    for step, flags in enumerate(steps, start=1):
        counts.append(guard.record(step, what="loss", **flags)[f"{guard.namespace}/bad_steps"])
        guard.check(step)
    return counts


def test_streak_resets_on_a_good_step():
    guard = BadStepGuard(3)
    # bad, bad, good, bad, bad: the longest streak is 2 < 3, so no stop; the total keeps counting: 1 2 2 3 4
    assert run(guard, [NAN, SKIP, GOOD, NAN, NAN]) == [1, 2, 2, 3, 4]
    assert (guard.streak, guard.total, guard.healthy) == (2, 4, False)
    run(guard, [GOOD])
    assert (guard.streak, guard.total, guard.healthy) == (0, 4, True)


def test_stops_exactly_at_max_bad_steps():
    guard = BadStepGuard(2)
    run(guard, [GOOD, NAN])  # steps 1, 2: streak 1 of 2, goes on
    guard.record(3, what="loss", **NAN)  # step 3: streak 2
    with pytest.raises(UserError) as err:
        guard.check(3)
    assert str(err.value).startswith("step 3: 2 consecutive bad steps (the last: NaN or inf loss)")


def test_zero_never_stops():
    guard = BadStepGuard(0)
    assert run(guard, [NAN] * 100)[-1] == 100
    assert guard.streak == 100


def test_message_names_the_reason_the_last_good_checkpoint_and_the_fixes():
    guard = BadStepGuard(2, namespace="ppo", step_name="PPO step", last_checkpoint=4)
    assert guard.record(5, nonfinite=False, skipped=False, what="reward")["ppo/bad_steps"] == 0
    assert guard.save_allowed(6) is True  # a checkpoint after good steps: the last good one now
    guard.record(7, nonfinite=True, skipped=False, what="reward")
    assert guard.save_allowed(7) is False  # never during a streak
    guard.record(8, nonfinite=True, skipped=True, what="reward")
    assert guard.save_allowed(8) is False
    message = guard.message(8)
    assert message.startswith("PPO step 8: 2 consecutive bad steps (the last: NaN or inf reward and update "
                              "skipped by the optimizer (NaN or inf gradient)); the last good checkpoint is step 6")
    for fix in ("lower the learning rate", "--dtype bf16 or fp32", "check the data", "raise --max_bad_steps (now 2"):
        assert fix in message.lower(), fix
    assert "no checkpoint was written" in BadStepGuard(1).message(1)


def test_negative_limit_is_refused():
    with pytest.raises(ValueError):
        BadStepGuard(-1)


class FakeFp16Engine:
    """DeepSpeed's fp16 bookkeeping, scripted: an overflowing step is skipped, counted in `skipped_steps`,
    makes `was_step_applied()` False and halves `optimizer.loss_scale` (hysteresis left out)."""

    def __init__(self, scale: float = 2.0 ** 16):
        self.skipped_steps, self._applied = 0, True
        self.optimizer = SimpleNamespace(loss_scale=scale)

    def step(self, overflow: bool) -> None:
        self._applied = not overflow
        if overflow:
            self.skipped_steps += 1
            self.optimizer.loss_scale /= 2

    def was_step_applied(self) -> bool:
        return self._applied


def test_fp16_overflow_accounting_on_a_fake_engine():
    engine, guard = FakeFp16Engine(), BadStepGuard(3)
    rows = []
    # The usual fp16 start: the first scales overflow (steps 1, 2), then it trains (3), one more overflow (4).
    for step, overflow in enumerate([True, True, False, True], start=1):
        engine.step(overflow)
        row = guard.record(step, nonfinite=False, skipped=not engine.was_step_applied(), what="loss")
        rows.append(row | optimizer_metrics(engine, "train/", fp16=True))
        guard.check(step)
    assert [r["train/bad_steps"] for r in rows] == [1, 2, 2, 3]
    assert [r["train/skipped_steps"] for r in rows] == [1, 2, 2, 3]
    # 2^16 halved at each overflow: 2^15, 2^14, 2^14, 2^13
    assert [r["train/loss_scale"] for r in rows] == [32768.0, 16384.0, 16384.0, 8192.0]
    # Three overflows in a row with --max_bad_steps 3: the run stops at the third.
    engine.step(True)
    guard.record(5, nonfinite=False, skipped=True, what="loss")
    engine.step(True)
    guard.record(6, nonfinite=False, skipped=True, what="loss")
    with pytest.raises(UserError, match=r"step 6: 3 consecutive bad steps \(the last: update skipped"):
        guard.check(6)


def test_optimizer_metrics_log_the_loss_scale_with_fp16_only():
    engine = SimpleNamespace(skipped_steps=2, optimizer=SimpleNamespace(loss_scale=1024.0))
    assert optimizer_metrics(engine, "ppo/actor_", fp16=True) == {"ppo/actor_skipped_steps": 2,
                                                                  "ppo/actor_loss_scale": 1024.0}
    assert optimizer_metrics(engine, "train/", fp16=False) == {"train/skipped_steps": 2}


def test_normalize_reward_moments_ignore_a_nan_batch():
    from engine.ppo.trainer import PPOTrainer
    from engine.rl.ppo import RunningMoments

    trainer = PPOTrainer.__new__(PPOTrainer)  # only what `_normalise` uses: the moments and the device
    trainer.score_moments, trainer.dist = RunningMoments(), SimpleNamespace(device=torch.device("cpu"))
    trainer._normalise(torch.tensor([1.0, 2.0, 3.0]))  # mean 2, m2 = 14 - 3 * 4 = 2
    out = trainer._normalise(torch.tensor([float("nan"), 5.0]))
    assert torch.isnan(out[0])  # the bad batch stays bad (the PPO step is skipped) ...
    assert trainer.score_moments.state_dict() == {"count": 3.0, "mean": 2.0, "m2": 2.0}  # ... the moments unchanged
    trainer._normalise(torch.tensor([float("inf")]))
    assert trainer.score_moments.state_dict() == {"count": 3.0, "mean": 2.0, "m2": 2.0}
