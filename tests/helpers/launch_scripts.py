"""Reading a launch script: the flags its `main.py` command passes (tests/unit/test_launch_scripts.py checks
them against the configs; tests/smoke/test_planner_recipes.py runs them)."""
from __future__ import annotations

import os
import re
import shlex
import subprocess
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


def parse_flags(args: list[str]) -> list[tuple[str, list[str]]]:
    """[(flag name without dashes, its values)] in order; `--flag=value` is split."""
    flags: list[tuple[str, list[str]]] = []
    for word in args:
        if word.startswith("--"):
            name, eq, value = word[2:].partition("=")
            flags.append((name, [value] if eq else []))
        else:
            assert flags, f"value {word!r} before any flag"
            flags[-1][1].append(word)
    return flags


def array_words(script: Path, name: str) -> list[str]:
    """The words a script assigns or appends to the bash array `name`."""
    words: list[str] = []
    for line in code_lines(script.read_text()).splitlines():
        m = re.match(rf"\s*{name}\+?=\((.*)\)\s*$", line)
        if m:
            words += shlex.split(m.group(1))
    return words


FAKE_DEEPSPEED = """#!/usr/bin/env bash
# records its arguments (NUL-separated, one record per line of the index) instead of launching anything
n=$(ls "$FAKE_DS_DIR" | wc -l)
printf '%s\\0' "$@" > "$FAKE_DS_DIR/call_$n"
"""


def launched_flag_sets(script: Path, tmp_path: Path) -> list[list[str]]:
    """The main.py argument lists a script launches, from a run with a stand-in `deepspeed` that only records
    them (required positional arguments get placeholder paths; the others their defaults)."""
    bin_dir, calls, work = tmp_path / "bin", tmp_path / "calls", tmp_path / "work"
    for folder in (bin_dir, calls, work):
        folder.mkdir(parents=True, exist_ok=True)
    fake = bin_dir / "deepspeed"
    fake.write_text(FAKE_DEEPSPEED)
    fake.chmod(0o755)
    text = code_lines(script.read_text())
    required = [int(n) for n in re.findall(r"\$\{(\d+):\?", text)]
    args = [f"/models/arg{n}" for n in range(1, max(required, default=0) + 1)]
    env = dict(os.environ, PATH=f"{bin_dir}:{os.environ['PATH']}", FAKE_DS_DIR=str(calls))
    result = subprocess.run(["bash", str(script), *args], cwd=work, env=env, capture_output=True, text=True,
                            timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    sets = []
    for record in sorted(calls.iterdir(), key=lambda p: int(p.name.split("_")[1])):
        words = record.read_text().split("\0")[:-1]
        at = [i for i, w in enumerate(words) if w.endswith("main.py")]
        assert at, words
        sets.append([*words[at[0]:]])
    return sets
