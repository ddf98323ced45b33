"""The warnings of a clean run, read from the probe (tests/helpers/warning_probe), and the allow-list.

A clean run (built-in tiny model, bundled data, no unusual flags) should show no warning at all; each
entry of ALLOWED is one we accept, with the reason. A warning not on the list fails the test that
counts them: fix it at its cause, or add it here with a reason a reviewer can check.
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

PROBE_DIR = Path(__file__).resolve().parent / "warning_probe"


@dataclass(frozen=True)
class Allowed:
    source: str   # regex on "<Category> <file>:<line>" (Python warnings) or "<LEVEL> <logger>" (log records)
    message: str  # regex on the first line of the message
    reason: str


ALLOWED: tuple[Allowed, ...] = (
    Allowed(r"WARNING DeepSpeed", r"Unable to find hostfile, will proceed with training with local resources only",
            "the launcher on one machine without a hostfile: expected (e2e_rlhf.py keeps it off the console "
            "unless --deployment-type multi_node, where a missing hostfile matters)"),
    Allowed(r"WARNING engine", r"compiling DeepSpeed's \S+ op for this environment",
            "the one-time op build of a fresh environment, announced on purpose (engine/runtime/op_builds.py): "
            "logged at WARNING because logging is not set up yet when DeepSpeed loads its CPU op"),
    Allowed(r"WARNING engine", r"waiting for another process .* to finish building DeepSpeed's",
            "another test process builds the op into the same fresh cache at that moment: said on purpose"),
    Allowed(r"WARNING engine", r"removed .*lock.* a lock left by a build of DeepSpeed's",
            "a stale build lock from a killed run, cleared on purpose with one line (engine/runtime/op_builds.py)"),
)


def probe_env(folder: Path, pythonpath: str) -> dict[str, str]:
    """Environment entries that turn the probe on in every Python process started with them."""
    return {"RLHF_WARNING_PROBE": str(folder), "PYTHONPATH": f"{PROBE_DIR}:{pythonpath}"}


def read_warnings(folder: Path) -> list[dict[str, str]]:
    """Every warning the probed processes showed, in process order (one dict per warning)."""
    out = []
    for path in sorted(folder.glob("*.jsonl")):
        out += [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return out


def unexpected(found: list[dict[str, str]], allowed: tuple[Allowed, ...] = ALLOWED) -> list[dict[str, str]]:
    """The warnings no allow-list entry matches."""
    return [w for w in found if not any(re.search(a.source, w["source"]) and re.search(a.message, w["message"])
                                        for a in allowed)]
