"""The bundled synthetic preference task: sort a list of digits.

Prompt " Human: sort 3 9 1 Assistant:", preferred answer " 1 3 9", rejected answer a plausible
mistake (the list unsorted, reversed, with two neighbours swapped, or sorted with a digit
missing, repeated, added or replaced). The truth is a rule a program checks (`is_correct`), so steps 2 and 3 can
show that the reward model and RLHF learned it.
"""
from __future__ import annotations

import json
import random
import re
from pathlib import Path

from engine.data.rows import Row

ASSET_DIR = Path(__file__).parents[1] / "assets" / "synthetic_sort"
PROMPT_RE = re.compile(r"Human: sort ((?:\d )*\d) Assistant:\s*$")
MIN_LEN, MAX_LEN = 3, 6
TRAIN_ROWS, EVAL_ROWS, DATA_SEED = 4000, 400, 20261121


def make_prompt(digits: list[int]) -> str:
    return " Human: sort " + " ".join(map(str, digits)) + " Assistant:"


def format_answer(digits: list[int]) -> str:
    return " " + " ".join(map(str, digits))


def _mistake(digits: list[int], rng: random.Random) -> list[int]:
    """A wrong answer a weak model might give; never equal to the sorted list."""
    truth = sorted(digits)
    kind = rng.choice(("unsorted", "reversed", "swap", "drop", "repeat", "insert", "substitute"))
    if kind == "swap" and len(set(truth)) > 1:
        out = list(truth)
        candidates = [i for i in range(len(out) - 1) if out[i] != out[i + 1]]
        i = rng.choice(candidates)
        out[i], out[i + 1] = out[i + 1], out[i]
        return out
    if kind == "drop":  # one element missing (a duplicate counted once too few, or any other)
        out = list(truth)
        del out[rng.randrange(len(out))]
        return out
    if kind == "repeat":  # one element counted one to three times too often (at the end: does not stop)
        i = rng.randrange(len(truth))
        return sorted(truth + [truth[i]] * rng.randint(1, 3))
    if kind == "insert":  # sorted, with one digit too many (any digit)
        return sorted(truth + [rng.randrange(10)])
    if kind == "substitute":  # sorted, with one digit replaced by another
        out = list(truth)
        i = rng.randrange(len(out))
        out[i] = rng.choice([d for d in range(10) if d != out[i]])
        return sorted(out)
    out = list(digits) if kind == "unsorted" else sorted(digits, reverse=True)
    return out if out != truth else truth[:-1]


def make_row(rng: random.Random) -> Row:
    digits = [rng.randrange(10) for _ in range(rng.randint(MIN_LEN, MAX_LEN))]
    return Row(prompt=make_prompt(digits), chosen=format_answer(sorted(digits)),
               rejected=format_answer(_mistake(digits, rng)))


def generate(n: int, seed: int) -> list[Row]:
    rng = random.Random(seed)
    return [make_row(rng) for _ in range(n)]


def parse_prompt(prompt: str) -> list[int] | None:
    """The digits of a task prompt, or None if the prompt is not one of ours."""
    m = PROMPT_RE.search(prompt)
    return [int(x) for x in m.group(1).split()] if m else None


def is_correct(prompt: str, answer: str) -> bool:
    """The rule: the answer's digits, ignoring spacing and anything after them, are the sorted list.

    A trailing end-of-text marker or whitespace is allowed; any other extra text is wrong.
    """
    digits = parse_prompt(prompt)
    if digits is None:
        raise ValueError(f"not a sorting-task prompt: {prompt!r}")
    answer = answer.replace("<|endoftext|>", "").strip()
    return answer.split() == [str(d) for d in sorted(digits)]


def write_bundle(folder: Path = ASSET_DIR) -> None:
    """(Re)write the bundled train/eval files. Deterministic: a test checks they match."""
    folder.mkdir(parents=True, exist_ok=True)
    rows = generate(TRAIN_ROWS + EVAL_ROWS, DATA_SEED)
    for name, part in (("train", rows[:TRAIN_ROWS]), ("eval", rows[TRAIN_ROWS:])):
        lines = [json.dumps({"prompt": r.prompt, "chosen": r.chosen, "rejected": r.rejected}) for r in part]
        (folder / f"{name}.jsonl").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    write_bundle()
