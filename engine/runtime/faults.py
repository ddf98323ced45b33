"""Fault injection for the reliability tests: real faults at chosen steps, set by one environment variable.

    RLHF_ENGINE_FAULT="kill:5:1"         rank 1 kills itself with SIGKILL in the middle of step 5
    RLHF_ENGINE_FAULT="killsave:4"       every rank SIGKILLs itself while step 4's checkpoint is half-written
    RLHF_ENGINE_FAULT="raise:3:1"        rank 1 raises a RuntimeError in the middle of step 3
    RLHF_ENGINE_FAULT="nan:3-4"          the loss (steps 1, 2) or the reward scores (step 3) of steps 3 and 4 are NaN
    RLHF_ENGINE_FAULT="nan:3-"           ... of step 3 and every later step

Each entry is `kind:steps[:rank]`, entries separated by commas; `steps` is `N`, `N-M` or `N-`; no rank
means every rank. Steps count from 1 (the optimizer or PPO step being taken). Unset, every call here is
a no-op. The faults are real: the process really dies by SIGKILL, the NaN really goes through the
loss and the backward pass; only the moment is chosen, so that a test can be deterministic.
"""
from __future__ import annotations

import functools
import os
import signal
from dataclasses import dataclass

import torch

ENV = "RLHF_ENGINE_FAULT"
KINDS = ("kill", "killsave", "raise", "nan")


@dataclass(frozen=True)
class Fault:
    kind: str
    first: int
    last: int | None  # None: no end
    rank: int | None  # None: every rank

    def applies(self, kind: str, step: int) -> bool:
        rank = int(os.environ.get("RANK", "0"))
        return (self.kind == kind and step >= self.first and (self.last is None or step <= self.last)
                and (self.rank is None or self.rank == rank))


def parse(text: str) -> list[Fault]:
    faults = []
    for entry in filter(None, (e.strip() for e in text.split(","))):
        parts = entry.split(":")
        if len(parts) not in (2, 3) or parts[0] not in KINDS:
            raise ValueError(f"{ENV}: bad entry {entry!r}; use kind:steps[:rank] with kind one of {KINDS}")
        first, dash, last = parts[1].partition("-")
        faults.append(Fault(parts[0], int(first), (int(last) if last else None) if dash else int(first),
                            int(parts[2]) if len(parts) == 3 else None))
    return faults


@functools.lru_cache(maxsize=4)
def _parsed(text: str) -> tuple[Fault, ...]:
    """`parse`, once per value of the variable (the training loops ask at every step)."""
    return tuple(parse(text))


def active(kind: str, step: int) -> bool:
    """Whether the fault `kind` is set for this rank at `step`."""
    text = os.environ.get(ENV)
    return bool(text) and any(f.applies(kind, step) for f in _parsed(text))


def mid_step(step: int) -> None:
    """Called in the middle of a training step (after a backward pass, before the optimizer step)."""
    if active("kill", step):
        os.kill(os.getpid(), signal.SIGKILL)
    if active("raise", step):
        raise RuntimeError(f"injected fault ({ENV}) at step {step}")


def mid_save(step: int) -> None:
    """Called while a checkpoint is being written (after the model and optimizer files, before it is sealed)."""
    if active("killsave", step):
        os.kill(os.getpid(), signal.SIGKILL)


def poison(values: torch.Tensor, step: int) -> torch.Tensor:
    """`values` made NaN (through the autograd graph) when the `nan` fault is set for `step`."""
    return values * float("nan") if active("nan", step) else values
