"""A reward function for benchmarking critic-free estimators on random-weight models: the answer's length.

Random weights never pass a task's rule, so a rule gives every answer of a group the same score and the
group estimators nothing to train on; the length of random text differs from answer to answer, so each
group has a spread of rewards and the benchmarked step does a real update. Given by file path:
`--reward_funcs benchmarks/length_reward.py:answer_length`.
"""
from __future__ import annotations

from typing import Any

# Characters per reward unit: keeps the reward of an answer of a few dozen tokens near 1 to 10.
CHARS_PER_UNIT = 10


def answer_length(prompts: list[str], completions: list[str], **columns: Any) -> list[float]:
    """The answer's length in characters over `CHARS_PER_UNIT` (TRL's reward-function signature)."""
    return [len(c) / CHARS_PER_UNIT for c in completions]
