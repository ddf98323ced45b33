"""Bad training steps: a NaN or inf loss or reward, or an update the optimizer skipped.

Every step's loop asks `BadStepGuard.record` about each optimizer (or PPO) step, logs what it returns,
then calls `check`, which stops the run with a `UserError` once --max_bad_steps steps in a row were
bad. `save_allowed` keeps checkpoints out of a bad streak, so that --resume restarts from good weights.

What DeepSpeed 0.19.8 does with a NaN or inf gradient (measured on CPU, a 2-layer model, gradient
accumulation 2, NaN loss on the last micro-batch of optimizer step 2; fp16, GPU-only, not measured):

    ZeRO 1, 2, 3, bf16 or fp32    DeepSpeedZeroOptimizer(_Stage3) finds it and skips the update
    ZeRO 0, bf16                  FP16_UnfusedOptimizer (FP16_Optimizer with FusedAdam on GPU) skips it
    ZeRO 0, fp32                  no wrapper: torch's AdamW applies it, and the weights become NaN

A skipped update leaves the weights as they were, adds one to `engine.skipped_steps` (which DeepSpeed
saves in its checkpoints), makes `engine.was_step_applied()` False and does not advance the learning-rate
schedule. With fp32 at ZeRO 0 every later step is bad too, so the run stops after --max_bad_steps; the
last checkpoint was written before the streak. With fp16 an overflow of the scaled gradients is the same
skip (and halves the loss scale): a step we count as bad, as the --max_bad_steps help says.

On --resume the streak starts at 0 (a checkpoint is never written during one) and `bad_steps` counts the
bad steps of this run since it started; DeepSpeed's `skipped_steps` covers the whole run.
"""
from __future__ import annotations

import logging
from typing import Any

from engine.errors import UserError
from engine.runtime.ds_private import loss_scale

logger = logging.getLogger("engine")


class BadStepGuard:
    """Counts bad steps and stops the run after `max_bad_steps` in a row (0: never).

    Args:
        max_bad_steps: --max_bad_steps.
        namespace: metric namespace of `record`'s count (`train` -> `train/bad_steps`).
        step_name: how messages name a step ("step", "PPO step").
        last_checkpoint: the step of the checkpoint this run resumed from, if any.
    """

    def __init__(self, max_bad_steps: int, *, namespace: str = "train", step_name: str = "step",
                 last_checkpoint: int | None = None):
        if max_bad_steps < 0:
            raise ValueError(f"max_bad_steps must be >= 0, not {max_bad_steps}")
        self.max_bad_steps, self.namespace, self.step_name = max_bad_steps, namespace, step_name
        self.last_checkpoint = last_checkpoint
        self.streak = 0   # bad steps in a row, up to the latest
        self.total = 0    # bad steps of this run
        self.reason = ""  # what was wrong with the latest bad step

    @property
    def healthy(self) -> bool:
        """False while a streak of bad steps is running (the latest step was bad)."""
        return self.streak == 0

    def record(self, step: int, *, nonfinite: bool, skipped: bool, what: str) -> dict[str, int]:
        """Count step `step`: bad when `nonfinite` (a NaN or inf `what`, e.g. "loss") or `skipped` (the
        optimizer skipped an update). The flags must agree on every rank. Returns {"<namespace>/bad_steps": total}."""
        if nonfinite or skipped:
            self.streak += 1
            self.total += 1
            reasons = ((f"NaN or inf {what}", nonfinite),
                       ("update skipped by the optimizer (NaN or inf gradient)", skipped))
            self.reason = " and ".join(text for text, on in reasons if on)
            limit = f" of at most {self.max_bad_steps}" if self.max_bad_steps else ""
            logger.warning("%s %d: bad step (%s), %d in a row%s", self.step_name, step, self.reason, self.streak, limit)
        else:
            self.streak = 0
        return {f"{self.namespace}/bad_steps": self.total}

    def check(self, step: int) -> None:
        """Raise a UserError when the streak has reached --max_bad_steps (call it after logging the step)."""
        if self.max_bad_steps and self.streak >= self.max_bad_steps:
            raise UserError(self.message(step))

    def message(self, step: int) -> str:
        if self.last_checkpoint is not None:
            where = (f"the last good checkpoint is step {self.last_checkpoint} (checkpoint-{self.last_checkpoint}; "
                     "--resume restarts from it)")
        else:
            where = "no checkpoint was written before them"
        return (f"{self.step_name} {step}: {self.streak} consecutive bad steps (the last: {self.reason}); {where}. "
                "Lower the learning rate, use --dtype bf16 or fp32, check the data, or raise --max_bad_steps "
                f"(now {self.max_bad_steps}; 0 never stops)")

    def save_allowed(self, step: int) -> bool:
        """Whether the checkpoint due at `step` may be written: not during a bad streak (a warning says so).
        When allowed, it becomes the last good checkpoint that `message` names."""
        if not self.healthy:
            logger.warning("%s %d: checkpoint not written: %d bad step(s) in a row", self.step_name, step, self.streak)
            return False
        self.last_checkpoint = step
        return True


def optimizer_metrics(engine: Any, prefix: str, fp16: bool) -> dict[str, float]:
    """DeepSpeed's count of skipped (overflowed) updates of a trained engine, `<prefix>skipped_steps`, and
    with fp16 the dynamic loss scale, `<prefix>loss_scale` (every DeepSpeed fp16 and ZeRO optimizer
    exposes it as `.loss_scale`)."""
    row = {f"{prefix}skipped_steps": engine.skipped_steps}
    if fp16:
        row[f"{prefix}loss_scale"] = loss_scale(engine)
    return row
