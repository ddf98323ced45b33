"""The checks every step's start-up report must pass (tests/smoke/test_startup_report.py)."""
from __future__ import annotations

import pytest

from engine.observe.startup import PARTS

KEYS = {"startup/to_first_step_s", "startup/other_s"} | {f"startup/{p}_s" for p in PARTS}


def check_startup(rows: list[dict], stderr: str, wall_s: float, step_time_key: str) -> dict[str, float]:
    """The start-up row of a run's metrics.jsonl `rows`, checked: only the first training step has it, with
    every key; the parts and `other` add up to the total; the total lies between the first step's own time
    (`step_time_key`) and the wall time the test measured around the whole process (`wall_s`); the log line
    says the same total. Returns the `startup/` values."""
    with_keys = [r for r in rows if any(k.startswith("startup/") for k in r)]
    assert len(with_keys) == 1, with_keys
    row = with_keys[0]
    first_step = min(r["step"] for r in rows if step_time_key in r)
    assert row["step"] == first_step and step_time_key in row
    startup = {k: v for k, v in row.items() if k.startswith("startup/")}
    assert set(startup) == KEYS
    assert all(v >= 0 for v in startup.values()), startup
    total = startup["startup/to_first_step_s"]
    parts = sum(v for k, v in startup.items() if k != "startup/to_first_step_s")
    assert parts == pytest.approx(total, abs=1e-6)
    assert startup["startup/other_s"] > 0 and parts - startup["startup/other_s"] <= total
    # Importing torch and transformers alone takes over a second; a start time read wrongly (the machine's
    # boot, or main's start) would be far off one way or the other.
    assert startup["startup/imports_s"] > 0.3
    assert row[step_time_key] < total < wall_s
    assert startup["startup/model_s"] > 0 and startup["startup/first_eval_s"] > 0
    assert f"start-up: {total:.1f} s to the first finished step (imports " in stderr
    return startup
