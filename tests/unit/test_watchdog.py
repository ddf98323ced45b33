"""The peer watchdog's decisions, in one process: two Watchdog objects over one TCPStore stand for two ranks."""
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest
import torch

from engine.runtime import watchdog
from engine.runtime.watchdog import Heartbeats, Watchdog


def test_heartbeats_stale_after_timeout_of_silence():
    beats = Heartbeats([1, 2], now=100.0)
    beats.update(1, 0, now=100.0)  # first reading: counts as a move
    beats.update(2, 0, now=100.0)
    beats.update(1, 5, now=108.0)  # rank 1 moved at 108; rank 2 is still at 0 since 100
    beats.update(2, 0, now=108.0)
    assert beats.stale(now=109.9, timeout=10.0) == []
    assert beats.stale(now=110.0, timeout=10.0) == [2]  # 110 - 100 = 10 s silent
    assert beats.stale(now=118.0, timeout=10.0) == [1, 2]  # 118 - 108 = 10 s silent
    beats.forget(2)
    assert beats.stale(now=118.0, timeout=10.0) == [1]


def test_process_gone_sees_exited_and_zombie_processes():
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    assert watchdog.process_gone(child.pid)
    child.wait()
    assert watchdog.process_gone(child.pid)
    assert not watchdog.process_gone(os.getpid())


@pytest.fixture
def pair():
    """(rank 0, rank 1, verdicts) sharing a fresh store; the verdicts list collects what would stop a rank."""
    host = torch.distributed.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    client = torch.distributed.TCPStore("127.0.0.1", host.port, None, False, timedelta(seconds=5))
    verdicts: list[tuple[int, int, str]] = []
    make = lambda store, rank: Watchdog(store, rank, 2, peer_timeout=0.4, host=f"127.0.0.1:{host.port}",
                                        on_peer_failure=lambda s, m: verdicts.append((rank, s, m)), poll_s=0.05)
    return make(host, 0), make(client, 1), verdicts


def test_failed_peer_is_named_with_its_reason_and_status(pair):
    rank0, rank1, _ = pair
    assert rank0.check() is None
    rank1.post_failure(2, "--lora_dim must be >= 0")
    assert rank0.check() == (2, "rank 1 failed: --lora_dim must be >= 0; stopping rank 0 too")


def test_silent_peer_is_stale_after_peer_timeout(pair):
    rank0, rank1, _ = pair  # rank 1 never beats: its thread is not started
    assert rank0.check() is None
    time.sleep(0.45)
    status, message = rank0.check()
    assert status == 1 and message.startswith(f"rank 1 (pid {os.getpid()} on host ")
    assert "sent no heartbeat for " in message and message.endswith("; stopping rank 0 too")


def test_dead_process_on_this_machine_is_seen_at_once(pair):
    rank0, rank1, _ = pair
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    rank1.store.set("proc/1", f"{rank1.me[0]} {child.pid} somehost")  # rank 1 "is" the exited child
    status, message = rank0.check()
    assert (status, message) == (1, f"rank 1 (pid {child.pid} on host somehost) died (killed, or out of memory); "
                                    "stopping rank 0 too")


def test_normal_finish_raises_no_alarm(pair):
    rank0, rank1, verdicts = pair
    rank0.start(), rank1.start()
    time.sleep(0.2)
    finishing = threading.Thread(target=rank1.finish)  # it waits for rank 0 to be done too, watching meanwhile
    finishing.start()
    time.sleep(0.5)  # longer than peer_timeout: rank 1 still beats while it waits
    rank0.finish()
    finishing.join(timeout=5)
    assert verdicts == []
    assert not rank0.thread.is_alive() and not rank1.thread.is_alive()


def test_store_gone_means_rank_0_is_gone():
    host = torch.distributed.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=5), wait_for_workers=False)
    client = torch.distributed.TCPStore("127.0.0.1", host.port, None, False, timedelta(seconds=5))
    rank1 = Watchdog(client, 1, 2, peer_timeout=5, host=f"127.0.0.1:{host.port}", on_peer_failure=print)
    assert rank1.check() is None
    del host  # rank 0 exits: its store goes with it
    status, message = rank1.check()
    assert status == 1 and message.startswith("rank 0 (which hosts the watchdog store at 127.0.0.1:")
    assert message.endswith("; stopping rank 1 too")


class BlockingStore:
    """A store whose calls never return once `blocked` is set: what a TCP connection does when the link to rank 0
    goes down (it fails only when the kernel gives up retransmitting, about 15 minutes later)."""

    def __init__(self):
        self.blocked = threading.Event()
        self.release = threading.Event()  # set at the end of the test, so the blocked thread can end
        self.values: dict[str, int] = {}

    def _wait(self):
        if self.blocked.is_set():
            self.release.wait()
            raise RuntimeError("released")

    def set(self, key, value):
        self._wait()

    def add(self, key, n):
        self._wait()
        self.values[key] = self.values.get(key, 0) + n
        return self.values[key]

    def check(self, keys):
        self._wait()
        return False


def test_a_store_call_that_never_returns_means_rank_0_is_unreachable():
    store, verdicts = BlockingStore(), []
    rank1 = Watchdog(store, 1, 2, peer_timeout=0.6, host="10.0.0.1:29500", poll_s=0.05,
                     on_peer_failure=lambda s, m: verdicts.append((s, m)))
    rank1.start()
    time.sleep(0.2)
    assert verdicts == []  # the store answers: all is well
    store.blocked.set()  # the link goes down: the watchdog thread blocks inside a store call
    started = time.monotonic()
    while not verdicts and time.monotonic() - started < 5:
        time.sleep(0.05)
    store.release.set()
    assert 0.6 <= time.monotonic() - started < 1.5
    assert verdicts == [(1, "rank 0 (which hosts the watchdog store at 10.0.0.1:29500) did not answer for 1 s (its "
                            "machine is down, or the network between this host and it; --peer_timeout sets this "
                            "limit); stopping rank 1 too")]


def test_a_store_call_of_the_main_thread_is_timed_too():
    store, verdicts = BlockingStore(), []
    rank1 = Watchdog(store, 1, 2, peer_timeout=0.4, host="10.0.0.1:29500", poll_s=0.05,
                     on_peer_failure=lambda s, m: verdicts.append((s, m)))
    rank1.procs[0] = ("m", 4321, "node0")  # read from the store earlier: rank 0 is named with its host
    rank1.guard.thread.start()  # the guard only: no heartbeat thread, so the blocked call is the main thread's
    store.blocked.set()
    threading.Thread(target=rank1.finish, daemon=True).start()  # posting done/1 blocks
    started = time.monotonic()
    while not verdicts and time.monotonic() - started < 3:
        time.sleep(0.05)
    store.release.set()
    assert verdicts and verdicts[0][1].startswith("rank 0 (pid 4321 on host node0, which hosts the watchdog store "
                                                  "at 10.0.0.1:29500) did not answer for ")


def test_a_collective_error_waits_for_the_watchdog_to_tell_why(pair, monkeypatch):
    rank0, rank1, _ = pair
    peer = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    rank1.store.set("proc/1", f"{rank1.me[0]} {peer.pid} node1")  # rank 1 "is" this live process
    rank0.timeout = 30.0  # a long --peer_timeout: only the death of the process can end the wait early
    monkeypatch.setattr(watchdog, "_active", rank0)
    assert watchdog.peer_failure() is None  # the collective broke a moment before rank 1's process is gone
    threading.Timer(0.3, peer.kill).start()  # not reaped: a zombie, as a SIGKILLed rank is for a moment
    started = time.monotonic()
    verdict = watchdog.peer_failure(wait=True)
    assert time.monotonic() - started < 2
    assert verdict == (1, f"rank 1 (pid {peer.pid} on host node1) died (killed, or out of memory); stopping rank 0 "
                          "too")
    peer.wait()


def test_collective_errors_are_told_from_engine_bugs():
    gloo = RuntimeError("[../third_party/gloo/gloo/transport/tcp/pair.cc:537] Read error [10.77.0.2]:41234: "
                        "Connection reset by peer. This is typically caused by a remote worker hanging or bugs in "
                        "the application.")
    assert watchdog.collective_error(gloo)
    assert watchdog.collective_error(torch.distributed.DistNetworkError("failed to connect"))
    assert not watchdog.collective_error(RuntimeError("injected fault (RLHF_ENGINE_FAULT) at step 3"))
    assert not watchdog.collective_error(KeyError("gloo"))


def test_a_stopping_rank_does_not_wait_on_an_unreachable_store():
    store = BlockingStore()
    rank1 = Watchdog(store, 1, 2, peer_timeout=5, host="10.0.0.1:29500", on_peer_failure=print)
    store.blocked.set()
    started = time.monotonic()
    rank1.acknowledge(wait_s=0.2)  # what stop_process does before it prints and exits
    assert time.monotonic() - started < 1
    store.release.set()


def c10_log_level() -> ctypes.c_int32:
    return ctypes.c_int32.in_dll(ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so")),
                                 "FLAGS_caffe2_log_level")


@pytest.mark.skipif(sys.platform != "linux", reason="reads libc10.so")
def test_torch_cpp_warnings_go_quiet_unless_the_user_set_a_level(monkeypatch):
    level = c10_log_level()
    before = level.value
    try:
        level.value = 1  # warnings on, as torch starts without TORCH_CPP_LOG_LEVEL
        monkeypatch.setenv("TORCH_CPP_LOG_LEVEL", "WARNING")
        watchdog.quiet_torch_warnings()
        assert level.value == 1  # the user's choice stands
        monkeypatch.delenv("TORCH_CPP_LOG_LEVEL")
        watchdog.quiet_torch_warnings()
        assert level.value == 2  # errors only
    finally:
        level.value = before
