"""When one of two CPU ranks dies or raises mid-step, the other stops soon, naming it, instead of hanging.

The ranks are started as two plain processes (as on two nodes), without a launcher that would tear the
group down for us: only the peer watchdog (engine/runtime/watchdog.py) can get rank 0 out of its collective.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.runtime.distributed import free_port
from tests.conftest import ROOT, offline_env

pytestmark = pytest.mark.distributed

# Rank 0 must be out this many seconds after rank 1 (with --peer_timeout 20; a dead process on the same
# machine is seen within a second).
STOP_WITHIN_S = 60


def run_two_ranks(engine_cache: Path, out: Path, fault: str) -> list[tuple[int, float, str]]:
    """(return code, monotonic exit time, stderr) of ranks 0 and 1 of step 1 under RLHF_ENGINE_FAULT=fault."""
    port = str(free_port())
    procs, logs = [], []
    for rank in range(2):
        env = offline_env(engine_cache) | dict(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                                               MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RLHF_ENGINE_FAULT=fault)
        logs.append(out.parent / f"{out.name}.rank{rank}.err")
        cmd = [sys.executable, str(ROOT / "step1_sft/main.py"), "--output_dir", str(out), "--disable_tqdm",
               "--per_device_train_batch_size", "4", "--max_seq_len", "64", "--peer_timeout", "20"]
        with logs[-1].open("w") as err:
            procs.append(subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err))
    ended: dict[int, float] = {}
    deadline = time.monotonic() + 240
    try:
        while len(ended) < 2 and time.monotonic() < deadline:
            for rank, proc in enumerate(procs):
                if rank not in ended and proc.poll() is not None:  # poll() also reaps a killed rank
                    ended[rank] = time.monotonic()
            time.sleep(0.1)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    assert len(ended) == 2, f"a rank still ran after 240 s:\n{logs[0].read_text()[-3000:]}"
    return [(proc.returncode, ended[rank], logs[rank].read_text()) for rank, proc in enumerate(procs)]


def test_killed_rank_stops_the_other(engine_cache, tmp_path):
    (code0, end0, err0), (code1, end1, _) = run_two_ranks(engine_cache, tmp_path / "out", "kill:3:1")
    assert code1 == -9  # SIGKILL, mid step 3
    assert code0 == 1, err0[-3000:]
    assert end0 - end1 < STOP_WITHIN_S
    assert "error: rank 1 (pid " in err0 and "died (killed, or out of memory); stopping rank 0 too" in err0
    assert "Traceback" not in err0


def test_raising_rank_stops_the_other_with_its_reason(engine_cache, tmp_path):
    (code0, end0, err0), (code1, end1, err1) = run_two_ranks(engine_cache, tmp_path / "out", "raise:3:1")
    assert code1 == 1 and "RuntimeError: injected fault" in err1  # an engine bug keeps its traceback
    assert code0 == 1, err0[-3000:]
    assert end0 - end1 < STOP_WITHIN_S
    assert ("error: rank 1 failed: RuntimeError: injected fault (RLHF_ENGINE_FAULT) at step 3; "
            "stopping rank 0 too") in err0
    assert "Traceback" not in err0
