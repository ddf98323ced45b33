"""The one row type every data source is normalised to."""
from __future__ import annotations

import random
from dataclasses import dataclass, field
from typing import Any

EVAL_FRACTION = 0.1  # held out of a source that has no eval part (DeepSpeed-Chat's 9:1)


@dataclass(frozen=True)
class Row:
    """A prompt with its preferred answer and, for preference data, the rejected one.

    `prompt` ends where the model's answer starts (e.g. "... Assistant:"), and answers carry their own
    leading space, so `prompt + chosen` is the full text of the conversation. A step-3 row read from a
    prompt-only record has chosen == "".

    `columns` are a step-3 prompt row's other fields (e.g. `answer`), for the reward functions; empty for
    the rows of steps 1 and 2.
    """

    prompt: str
    chosen: str
    rejected: str | None = None
    columns: dict[str, Any] = field(default_factory=dict, hash=False)


def carve_eval(rows: list[Row], seed: int,
               fraction: float = EVAL_FRACTION) -> tuple[list[Row], list[Row]]:
    """Split `rows` into (train, eval), eval being `fraction` of them picked by `seed`.

    Deterministic for a given seed and input order (random.Random, not torch, so it needs no
    framework and is the same on every rank). Both parts keep the input order. With fewer than
    two rows there is nothing to hold out and eval is empty.
    """
    if len(rows) < 2:
        return list(rows), []
    n_eval = max(1, int(len(rows) * fraction))
    held_out = set(random.Random(seed).sample(range(len(rows)), n_eval))
    train = [r for i, r in enumerate(rows) if i not in held_out]
    return train, [r for i, r in enumerate(rows) if i in held_out]
