"""engine/observe/startup.py: nested parts are counted once, the parts and `other` add up to the total, the
report comes once, and the process start time is this process's."""
from __future__ import annotations

import importlib._bootstrap
import sys
import time

import psutil
import pytest

from engine.observe import startup


class Clock:
    """time.perf_counter and time.time, moved by hand."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch) -> Clock:
    c = Clock()
    monkeypatch.setattr(startup.time, "perf_counter", c)
    monkeypatch.setattr(startup.time, "time", c)
    return c


def test_a_nested_part_is_taken_out_of_the_part_around_it(clock):
    run = startup.Startup(t0=clock.now - 2.0, imports_s=2.0)  # 2 s of imports before main
    with run.part("model"):
        clock.now += 1.0
        with run.part("op_builds"):
            clock.now += 5.0
        clock.now += 0.5
    with run.part("first_eval"):
        clock.now += 0.25
    clock.now += 0.75  # the first step itself
    row = run.finish()
    # model: 1 + 0.5 (its 5 s of op builds are op_builds'); other: 0.75; total 2 + 6.5 + 0.25 + 0.75 = 9.5
    assert row["startup/model_s"] == 1.5 and row["startup/op_builds_s"] == 5.0
    assert row["startup/imports_s"] == 2.0 and row["startup/first_eval_s"] == 0.25
    assert row["startup/to_first_step_s"] == 9.5 and row["startup/other_s"] == 0.75
    assert row["startup/data_s"] == 0.0 and row["startup/distributed_s"] == 0.0  # parts that never ran: 0
    assert run.finish() == {}  # once


def test_parts_add_up_when_a_part_repeats(clock):
    run = startup.Startup(t0=clock.now, imports_s=0.0)
    for _ in range(3):
        with run.part("data"):
            clock.now += 1.0
    row = run.finish()
    assert row["startup/data_s"] == 3.0 and row["startup/to_first_step_s"] == 3.0 and row["startup/other_s"] == 0.0
    with run.part("data"):  # after the first step nothing counts
        clock.now += 1.0
    assert run.seconds["data"] == 3.0


def test_begin_counts_from_the_process_start_once_after_launched(clock, monkeypatch):
    monkeypatch.setattr(startup, "process_start_time", lambda: clock.now - 4.0)
    startup.launched()
    assert startup.begin().seconds["imports"] == 4.0
    assert startup.begin().seconds["imports"] == 0.0  # a second main in the same process: from its own start
    with startup.part("data"):
        clock.now += 2.0
    row = startup.first_step_done()
    assert row["startup/to_first_step_s"] == 2.0 and row["startup/data_s"] == 2.0
    assert startup.first_step_done() == {}


def test_process_start_time_is_this_process_start():
    start = startup.process_start_time()
    # psutil rounds to the boot time's whole second; the pytest process started before this test ran.
    assert abs(start - psutil.Process().create_time()) < 1.5
    assert start < time.time()


def test_a_first_import_inside_a_part_counts_as_imports(tmp_path, monkeypatch):
    (tmp_path / "slow_module_for_startup.py").write_text("import time\ntime.sleep(0.3)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    run = startup.Startup(t0=time.time(), imports_s=0.0)
    with run.part("model"):
        import slow_module_for_startup  # noqa: F401  (first import: 0.3 s)
    row = run.finish()
    assert row["startup/imports_s"] >= 0.3 and row["startup/model_s"] < 0.3
    assert importlib._bootstrap._find_and_load != run._timed_import  # unhooked after the report
    monkeypatch.delitem(sys.modules, "slow_module_for_startup")


def test_run_main_stops_the_import_timing_of_a_run_that_failed_early():
    from engine.errors import UserError
    from engine.runtime.entry import run_main

    def main(argv):
        startup.begin()
        raise UserError("bad input")

    with pytest.raises(SystemExit):
        run_main(main, [])
    assert startup._current is None
    assert importlib._bootstrap._find_and_load.__module__ != startup.__name__  # CPython's own again
