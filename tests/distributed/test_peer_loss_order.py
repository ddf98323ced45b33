"""A lost peer gives the same one line whichever notices first: the collective rank 0 waits in, or the watchdog.

Rank 1 runs in a PID namespace of its own, so that rank 0 cannot see its process (as from another machine)
and learns of its death only from its silent heartbeat, after --peer_timeout. With a long --peer_timeout the
collective breaks first ("Connection reset by peer"), and rank 0 waits for the watchdog's verdict; with a short
one and rank 0 busy elsewhere, the watchdog stops it first. Two bare processes (tests/helpers/peer_loss_probe.py),
no model: seconds each.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time

import pytest

from engine.runtime.distributed import free_port
from tests.conftest import ROOT, offline_env

pytestmark = [pytest.mark.distributed,
              pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                                 reason="needs root and unshare (util-linux) for a PID namespace")]


def run_probe(engine_cache, mode: str, peer_timeout: int) -> tuple[int, str, float]:
    """(exit status, stderr, seconds from rank 1's death to rank 0's exit) of rank 0."""
    env = offline_env(engine_cache) | dict(WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()),
                                           PYTHONPATH=str(ROOT))
    probe = [sys.executable, "-m", "tests.helpers.peer_loss_probe", mode, str(peer_timeout)]
    rank0 = subprocess.Popen(probe, cwd=ROOT, env=env | dict(RANK="0", LOCAL_RANK="0"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    # `sh` stays the namespace's init (PID 1 ignores its own SIGKILL), the probe runs under it.
    rank1 = subprocess.Popen(["unshare", "--pid", "--fork", "sh", "-c", " ".join(probe) + "; exit $?"], cwd=ROOT,
                             env=env | dict(RANK="1", LOCAL_RANK="1"), stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL)
    try:
        rank1.wait(timeout=180)
        died = time.monotonic()
        _, err = rank0.communicate(timeout=peer_timeout + 60)
        return rank0.returncode, err, time.monotonic() - died
    finally:
        for proc in (rank0, rank1):
            if proc.poll() is None:
                proc.kill()
                proc.wait()


# Silent for --peer_timeout, up to a poll more (a second, or a quarter of --peer_timeout) when seen.
LOST = re.compile(r"^error: rank 1 \(pid \d+ on host \S+\) sent no heartbeat for (\d+) s \(hung, or its machine is "
                  r"unreachable; --peer_timeout sets this limit\); stopping rank 0 too$", re.M)


def test_collective_breaks_first_and_waits_for_the_watchdog(engine_cache):
    code, err, after = run_probe(engine_cache, "collective", peer_timeout=10)
    assert code == 1, err[-3000:]
    assert (found := LOST.search(err)) and 10 <= int(found.group(1)) <= 11, err[-3000:]
    assert "Traceback" not in err and "Connection reset" not in err
    assert 9 <= after < 25  # the collective broke at once; the verdict came from the silent heartbeat


def test_watchdog_sees_it_first(engine_cache):
    code, err, after = run_probe(engine_cache, "sleep", peer_timeout=3)
    assert code == 1, err[-3000:]
    assert (found := LOST.search(err)) and 3 <= int(found.group(1)) <= 4, err[-3000:]
    assert "Traceback" not in err
    assert after < 9  # during rank 0's sleep of 3 x --peer_timeout: the watchdog thread stopped it
