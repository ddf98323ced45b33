"""The peer watchdog's decisions, in one process: two Watchdog objects over one TCPStore stand for two ranks."""
from __future__ import annotations

import os
import subprocess
import sys
import threading
import time
from datetime import timedelta

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
