"""Reward functions for step-3 tests: they score the random built-in model's answers unevenly (the task's rule
scores them all 0, which gives GRPO nothing to learn from)."""
from __future__ import annotations

from typing import Any


def answer_length(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """The answer's length in characters, over 10."""
    return [len(c) / 10 for c in completions]
