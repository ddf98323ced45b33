"""Reading a launch script: the flags its `main.py` command passes (tests/unit/test_launch_scripts.py checks
them against the configs; tests/smoke/test_planner_recipes.py runs them)."""
from __future__ import annotations

import re
import shlex
from pathlib import Path

# The end of the main.py command: a redirection, pipe or command separator.
COMMAND_END = {"|", "||", "&&", ";", "&", "2>&1", "&>", ">", ">>", "2>"}


def code_lines(text: str) -> str:
    """The script with backslash continuations joined and comment lines dropped."""
    joined = re.sub(r"\\\n", " ", text)
    return "\n".join(line for line in joined.splitlines() if not line.lstrip().startswith("#"))


def main_py_args(script: Path) -> list[str]:
    """The words after `.../main.py` in the (single) command that runs it, up to a redirection/pipe."""
    commands = [line for line in code_lines(script.read_text()).splitlines()
                if re.search(r"main\.py\b", line)]
    assert len(commands) == 1, f"{script}: expected one command running main.py, found {len(commands)}"
    words = shlex.split(commands[0], comments=True)
    at = [i for i, w in enumerate(words) if w.endswith("main.py")]
    assert at, f"{script}: no main.py word in {commands[0]!r}"
    args: list[str] = []
    for word in words[at[0] + 1:]:
        if word in COMMAND_END or word.startswith(("2>", "&>", ">", "|")):
            break
        if re.fullmatch(r"\$\{@:\d+\}|\$@", word):  # the script's own extra arguments, passed on as they are
            continue
        array = re.fullmatch(r"\$\{(\w+)\[@\]\}", word)
        if array:  # a bash array of optional flags: check what the script may put in it
            args += array_words(script, array.group(1))
        else:
            args.append(word)
    return args


def array_words(script: Path, name: str) -> list[str]:
    """The words a script assigns or appends to the bash array `name`."""
    words: list[str] = []
    for line in code_lines(script.read_text()).splitlines():
        m = re.match(rf"\s*{name}\+?=\((.*)\)\s*$", line)
        if m:
            words += shlex.split(m.group(1))
    return words
