"""The start-up limit (engine/runtime/startup_guard.py): a rank not through start-up in time stops with one line
naming the master address and what to check; a communication error inside becomes the same line; time spent
building an op does not count."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from engine.errors import UserError
from engine.runtime import startup_guard, watchdog

RANK1 = dict(RANK="1", WORLD_SIZE="2", MASTER_ADDR="10.77.0.1", MASTER_PORT="29511")


@pytest.fixture
def stops(monkeypatch) -> list[tuple[int, str]]:
    """What the guard would print and exit with (the real one ends the process)."""
    for name, value in RANK1.items():
        monkeypatch.setenv(name, value)
    seen: list[tuple[int, str]] = []
    monkeypatch.setattr(watchdog, "stop_process", lambda status, message: seen.append((status, message)))
    return seen


def test_a_start_up_past_the_limit_stops_naming_the_master(stops):
    with startup_guard.guard(0.3):
        time.sleep(0.6)  # stands for a connect to an unreachable master, which blocks in C++
    assert len(stops) == 1
    status, message = stops[0]
    assert status == 2
    assert message.startswith("start-up did not finish in 0 s (--startup_timeout): rank 1 of 2 was joining the "
                              "process group, reaching the master at 10.77.0.1:29511. Check that all 2 ranks were "
                              "started; that MASTER_ADDR=10.77.0.1 is the master host's address")
    assert "GLOO_SOCKET_IFNAME" in message and "NCCL_SOCKET_IFNAME" in message


def test_time_building_an_op_does_not_count(stops):
    with startup_guard.guard(0.3):
        with startup_guard.paused():
            time.sleep(0.5)
        time.sleep(0.1)
    assert stops == []


def test_a_connection_error_inside_becomes_the_same_line(stops):
    with pytest.raises(UserError) as err:
        with startup_guard.guard(30):
            raise torch.distributed.DistNetworkError("The client socket has failed to connect to any network "
                                                     "address of (10.77.0.1, 29511).")
    assert str(err.value).startswith("start-up failed: rank 1 of 2 was joining the process group, reaching the "
                                     "master at 10.77.0.1:29511. Check that all 2 ranks were started;")
    assert str(err.value).endswith("(DistNetworkError: The client socket has failed to connect to any network "
                                   "address of (10.77.0.1, 29511).)")
    with pytest.raises(KeyError):  # an engine bug keeps its traceback
        with startup_guard.guard(30):
            raise KeyError("x")
    assert stops == []


def test_no_limit_at_zero(stops):
    with startup_guard.guard(0) as guard:
        assert guard is None
        with startup_guard.paused():
            pass


TORCH_LINES = ("[W1207 06:49:22.276213071 socket.cpp:764] [c10d] The client socket has failed to connect to "
               "10.77.0.1:29511 (errno: 113 - No route to host).\n"
               "Exception raised from run at /pytorch/torch/csrc/distributed/c10d/socket.cpp:820 (most recent call "
               "first):\nframe #0: c10::Error::Error(c10::SourceLocation) + 0x9d (0x7f in libc10.so)\n"
               "<omitting python frames>\n\n")


def test_torch_connection_log_is_dropped_from_a_failed_start_up_only(stops, capfd):
    with startup_guard.guard(30):
        os.write(2, b"a DeepSpeed warning\n" + TORCH_LINES.encode())
    assert capfd.readouterr().err == "a DeepSpeed warning\n" + TORCH_LINES  # a start-up that succeeds: all of it
    with pytest.raises(UserError):
        with startup_guard.guard(30):
            os.write(2, TORCH_LINES.encode() + b"a DeepSpeed warning\n")
            raise torch.distributed.DistNetworkError("failed to connect")
    assert capfd.readouterr().err == "a DeepSpeed warning\n"


STOP_FROM_ANOTHER_THREAD = f"""
import os, threading
from engine.runtime import startup_guard, watchdog
with startup_guard.guard(60):
    with startup_guard.paused():  # an op build lets stderr through, then the guard holds it in a new file
        pass
    os.write(2, {TORCH_LINES.encode()!r} + b"a DeepSpeed warning\\n")
    threading.Thread(target=watchdog.stop_process, args=(2, "the world-size check says so")).start()
    threading.Event().wait(30)
"""


def test_a_stop_from_another_thread_during_start_up_prints_its_line():
    """The world-size check (engine/runtime/network.py) stops the process from a thread of its own while the
    guard holds stderr in a file: its line and what was held reach the real stderr, less torch's log lines."""
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2]), **RANK1}
    proc = subprocess.run([sys.executable, "-c", STOP_FROM_ANOTHER_THREAD], env=env, capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 2
    assert proc.stderr == "a DeepSpeed warning\nerror: the world-size check says so\n"
