"""Built-in reward functions, named as `--reward_funcs engine.rewards.builtin:<name>`.

Both have TRL's signature, `fn(prompts, completions, **columns) -> list[float | None]`.
"""
from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Any

from engine.data.sort_task import is_correct, parse_prompt

# A number as written in a solution: optional sign, digits with thousands commas, optional decimals.
NUMBER = re.compile(r"-?\d[\d,]*(?:\.\d+)?")
FINAL = re.compile(r"####\s*\$?\s*(-?\d[\d,]*(?:\.\d+)?)")  # GSM8K's "#### 42" (a "$" is tolerated)


def sort_rule(prompts: list[str], completions: list[str], **columns: Any) -> list[float | None]:
    """The bundled sorting task's rule (`engine.data.sort_task.is_correct`): 1.0 when the completion is the
    prompt's digits sorted, else 0.0; None for a prompt that is not the task's (no score)."""
    return [None if parse_prompt(p) is None else float(is_correct(p, c)) for p, c in zip(prompts, completions)]


def gsm8k_answer(prompts: list[str], completions: list[str], answer: list[Any] | None = None,
                 ground_truth: list[Any] | None = None, **columns: Any) -> list[float | None]:
    """GSM8K's final-answer match: 1.0 when the completion's final answer equals the ground truth's, else 0.0.

    The ground truth is the `answer` column (GSM8K's "...reasoning... #### 42"), else `ground_truth`; its
    number is the one after "####", or the whole value when it is a bare number. The completion's final
    answer is the number after its last "####", else its last number. Compared as exact decimals with
    thousands commas removed ("1,000" == "1000.0"). A row whose ground truth is missing gets None.
    """
    truths = answer if answer is not None else ground_truth
    if truths is None:
        raise ValueError("gsm8k_answer needs an 'answer' or 'ground_truth' column in the prompt dataset "
                         "(map yours with --prompt_column_map)")
    out: list[float | None] = []
    for truth, completion in zip(truths, completions):
        if truth is None:
            out.append(None)
            continue
        expected = truth_number(truth)
        got = final_number(completion)
        out.append(float(got is not None and got == expected))
    return out


def _decimal(text: str) -> Decimal | None:
    try:
        return Decimal(text.replace(",", ""))
    except InvalidOperation:
        return None


def truth_number(truth: Any) -> Decimal:
    """The number of a ground truth: after "####", or the value itself (a number or a numeric string)."""
    if isinstance(truth, (int, float)) and not isinstance(truth, bool):
        return Decimal(str(truth))
    text = str(truth)
    marked = FINAL.findall(text)
    value = _decimal(marked[-1]) if marked else _decimal(text.strip())
    if value is None:
        raise ValueError(f"ground truth {text[:80]!r} has no '#### <number>' and is not a number")
    return value


def final_number(completion: str) -> Decimal | None:
    """The completion's final answer: the number after its last "####", else its last number, else None."""
    marked = FINAL.findall(completion)
    if marked:
        return _decimal(marked[-1])
    numbers = NUMBER.findall(completion)
    return _decimal(numbers[-1]) if numbers else None
