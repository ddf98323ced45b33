"""Start-up time: from the process's start to the end of the first training step, and the fixed costs in it.

A step's `main` calls `begin()`, wraps each fixed cost in `with part(name):` (nested parts are not counted
twice: an op build inside the model's set-up is `op_builds`, not `model`) and, after its first training
step, adds `first_step_done()` to that step's metrics:

    startup/to_first_step_s   process start (or `begin()` for a main called in-process) to the first finished step
    startup/<part>_s          each of PARTS, seconds
    startup/other_s           the rest: config parsing, input checks, resume, the first step itself

so the parts and `other` add up to the total. `imports` is the time from the process's start to `begin()`
(the interpreter, torch, the engine) plus every module first imported later, until the first step: DeepSpeed,
and the model family's code that transformers imports lazily in `from_pretrained`. Those are timed by wrapping
CPython's `importlib._bootstrap._find_and_load` (what an `import` of a module not yet in sys.modules calls;
CPython 3.8-3.13) from `begin()` to the first step; where it is missing they stay in the part that ran them.
"""
from __future__ import annotations

import importlib._bootstrap
import logging
import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

logger = logging.getLogger("engine")

PARTS = ("imports", "distributed", "op_builds", "model", "data", "first_eval")


class Startup:
    """The start-up parts of one run, timed from `t0` (a `time.time()`); until `finish()` the first import of
    each module is timed as `imports`."""

    def __init__(self, t0: float, imports_s: float) -> None:
        self.t0 = t0
        self.seconds: dict[str, float] = dict.fromkeys(PARTS, 0.0)
        self.seconds["imports"] = imports_s
        self.done = False
        self._nested: list[float] = []  # per open part: seconds its nested parts took
        self._thread = threading.get_ident()
        self._find_and_load = getattr(importlib._bootstrap, "_find_and_load", None)
        if self._find_and_load is not None:
            importlib._bootstrap._find_and_load = self._timed_import

    def _timed_import(self, *args, **kwargs):
        if self.done or threading.get_ident() != self._thread:  # the part stack is the main thread's
            return self._find_and_load(*args, **kwargs)
        with self.part("imports"):
            return self._find_and_load(*args, **kwargs)

    def _unhook(self) -> None:
        if self._find_and_load is not None and importlib._bootstrap._find_and_load == self._timed_import:
            importlib._bootstrap._find_and_load = self._find_and_load

    @contextmanager
    def part(self, name: str) -> Iterator[None]:
        if self.done:  # after the first step nothing is start-up
            yield
            return
        start = time.perf_counter()
        self._nested.append(0.0)
        try:
            yield
        finally:
            elapsed = time.perf_counter() - start
            nested = self._nested.pop()
            self.seconds[name] = self.seconds.get(name, 0.0) + elapsed - nested
            if self._nested:
                self._nested[-1] += elapsed

    def finish(self) -> dict[str, float]:
        """The `startup/` metrics, once; {} on later calls."""
        if self.done:
            return {}
        self.done = True
        self._unhook()
        total = time.time() - self.t0
        row = {"startup/to_first_step_s": total} | {f"startup/{k}_s": v for k, v in self.seconds.items()}
        row["startup/other_s"] = max(total - sum(self.seconds.values()), 0.0)
        return row


_current: Startup | None = None
_from_process_start = False


def process_start_time() -> float:
    """`time.time()` at this process's start: its start tick (/proc/self/stat) against /proc/uptime, to 10 ms;
    psutil's create_time (whole seconds of boot time on Linux) where /proc cannot tell."""
    try:
        with open("/proc/self/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in (...) may hold spaces
        with open("/proc/uptime") as f:
            uptime = float(f.read().split()[0])
        start_ticks = int(fields[19])  # field 22, starttime; fields[0] is field 3
        return time.time() - (uptime - start_ticks / os.sysconf("SC_CLK_TCK"))
    except (OSError, ValueError, IndexError):
        import psutil

        return psutil.Process().create_time()


def launched() -> None:
    """Mark this process as started for one run (`run_main`): the next `begin()` counts from its start."""
    global _from_process_start
    _from_process_start = True


def begin() -> Startup:
    """Start this run's record: from the process's start after `launched()` (once), else from now."""
    global _current, _from_process_start
    now = time.time()
    t0 = process_start_time() if _from_process_start else now
    _from_process_start = False
    end()  # a run in this process that never reached its first step
    _current = Startup(min(t0, now), now - min(t0, now))
    return _current


def end() -> None:
    """Close the current run's record without a report (its import timing stops)."""
    global _current
    if _current is not None:
        _current.finish()
        _current = None


@contextmanager
def part(name: str) -> Iterator[None]:
    """Time `name` into the current run's start-up; nothing when no run has begun."""
    if _current is None:
        yield
        return
    with _current.part(name):
        yield


def first_step_done(is_main: bool = True) -> dict[str, float]:
    """The `startup/` metrics after the first step (with one log line on the main rank); {} afterwards."""
    row = _current.finish() if _current is not None else {}
    if row and is_main:
        logger.info("start-up: %.1f s to the first finished step (%s)", row["startup/to_first_step_s"],
                    ", ".join(f"{k[8:-2]} {v:.1f} s" for k, v in row.items() if k != "startup/to_first_step_s"))
    return row
