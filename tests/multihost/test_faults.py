"""Network faults across two hosts: every surviving rank, on every host, stops in time naming the lost host, with
one line and no traceback, and the last sealed checkpoint resumes.

Step 1 on the tiny model, one plain process per host (RANK, WORLD_SIZE, MASTER_ADDR as a launcher sets them; no
launcher that would tear the group down for us), the output folder on a file system both hosts see.
- the link to node1 goes down after step 2's checkpoint: node0's rank 0 hears no heartbeat, node1's rank 1 gets
  no answer from the store on node0; both stop within --peer_timeout and a margin; the link comes back and
  `--resume` goes on from the newest sealed checkpoint;
- in that resumed run, after its first checkpoint, node0's processes are killed (the master: node1 loses the
  store too); node1 stops in time, and that checkpoint is intact;
- the link is down from the start: both stop within --startup_timeout and a margin, naming the master address.
"""
from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.runtime.checkpoint import checkpoint_problem, checkpoint_tags, tag_step
from tests.conftest import ROOT, offline_env, tiny_model_folder

pytestmark = pytest.mark.multihost

PEER_TIMEOUT = 10
STARTUP_TIMEOUT = 5  # the start-up test only: the healthy runs keep the default
# Seconds past the limit a rank may take to stop: a poll of the watchdog, the exit itself, a loaded machine.
MARGIN_S = 15
PORT = "29533"  # each host has its own ports: no other job can hold this one
COMMON = ["--disable_tqdm", "--per_device_train_batch_size", "4", "--max_seq_len", "48", "--zero_stage", "2",
          "--dtype", "fp32", "--save_interval", "2", "--test_stop_step", "20", "--peer_timeout", str(PEER_TIMEOUT)]


class Run:
    """Rank i of step 1 on host i; each rank's stderr in `<out>.rank<i>.err`."""

    def __init__(self, hosts, engine_cache: Path, out: Path, args: list[str] = ()):
        self.logs = [out.parent / f"{out.name}.rank{i}.err" for i in range(2)]
        self.procs = []
        tiny_model_folder(engine_cache)  # made here, once: each host's local rank 0 would make its own copy
        for rank, host in enumerate(hosts):
            env = offline_env(engine_cache) | dict(RANK=str(rank), LOCAL_RANK="0", WORLD_SIZE="2", MASTER_PORT=PORT,
                                                   MASTER_ADDR=hosts[0].addr, GLOO_SOCKET_IFNAME="eth0")
            cmd = [sys.executable, str(ROOT / "step1_sft/main.py"), "--output_dir", str(out), *COMMON, *args]
            with self.logs[rank].open("w") as err:
                self.procs.append(host.popen(cmd, env=env, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=err))

    def wait(self, limit_s: float) -> list[tuple[int, float, str]]:
        """(exit status, monotonic exit time, stderr) of each rank; fails if one still runs after `limit_s`."""
        ended: dict[int, float] = {}
        deadline = time.monotonic() + limit_s
        while len(ended) < 2 and time.monotonic() < deadline:
            for rank, proc in enumerate(self.procs):
                if rank not in ended and proc.poll() is not None:
                    ended[rank] = time.monotonic()
            time.sleep(0.1)
        running = [rank for rank in range(2) if rank not in ended]
        for rank in running:
            self.procs[rank].kill()
            self.procs[rank].wait()
        assert not running, f"ranks {running} ran past {limit_s:.0f} s:\n{self.logs[running[0]].read_text()[-3000:]}"
        return [(proc.returncode, ended[rank], log.read_text()) for (rank, proc), log in
                zip(enumerate(self.procs), self.logs)]


def wait_for(run: Run, condition, limit_s: float, what: str) -> float:
    """Wait until `condition()` while both ranks run; the monotonic time it became true."""
    deadline = time.monotonic() + limit_s
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {limit_s:.0f} s"
        for rank, proc in enumerate(run.procs):
            assert proc.poll() is None, f"rank {rank} stopped before {what}:\n{run.logs[rank].read_text()[-3000:]}"
        time.sleep(0.1)
    return time.monotonic()


def intact(out: Path, step: int) -> bool:
    return checkpoint_problem(out / "ds_checkpoint", f"step{step}") is None


def test_link_down_then_resume_then_master_killed(hosts, engine_cache, tmp_path):
    """One training run through two faults (two launches, not three: the tier has 1.5 minutes)."""
    node0, node1 = hosts
    out = tmp_path / "out"
    run = Run(hosts, engine_cache, out)
    wait_for(run, lambda: intact(out, 2), 120, "step 2's checkpoint")
    hosts.link_down(node1)  # mid-training: the next collective across the link never completes
    down = time.monotonic()
    (code0, end0, err0), (code1, end1, err1) = run.wait(PEER_TIMEOUT + MARGIN_S + 30)
    assert code0 == 1 and code1 == 1, err0[-2000:] + err1[-2000:]
    assert end0 - down < PEER_TIMEOUT + MARGIN_S and end1 - down < PEER_TIMEOUT + MARGIN_S
    assert f"error: rank 1 (pid {run.procs[1].pid} on host node1) sent no heartbeat for " in err0, err0[-2000:]
    assert (f"error: rank 0 (pid {run.procs[0].pid} on host node0, which hosts the watchdog store at {node0.addr}:"
            in err1 and "did not answer for " in err1), err1[-2000:]
    assert "Traceback" not in err0 + err1 and "frame #" not in err0 + err1  # nor torch's C++ stacks
    print(f"MEASURE link down: rank 0 {end0 - down:.1f} s, rank 1 {end1 - down:.1f} s")
    # Steps are fast: the link may have gone down in step 3, 4 or step 4's save. The newest sealed checkpoint
    # is whole and any later one is not.
    newest = tag_step(checkpoint_tags(out / "ds_checkpoint")[0])
    if not intact(out, newest):
        newest -= 2
    assert newest >= 2 and intact(out, newest)

    hosts.link_up(node1)
    resumed = Run(hosts, engine_cache, out, ["--resume"])
    wait_for(resumed, lambda: intact(out, newest + 2), 120, f"step {newest + 2}'s checkpoint after the resume")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in rows if "train/loss" in r]
    assert steps[:newest + 2] == list(range(1, newest + 3)), steps  # went on from `newest`, each step once

    hosts.kill(node0)  # mid-training again: the master host, with the store, is gone
    killed = time.monotonic()
    (code0, _, _), (code1, end1, err1) = resumed.wait(PEER_TIMEOUT + MARGIN_S + 30)
    assert code0 == -9
    assert code1 == 1, err1[-3000:]
    assert end1 - killed < PEER_TIMEOUT + MARGIN_S
    assert (f"error: rank 0 (pid {resumed.procs[0].pid} on host node0, which hosts the watchdog store at "
            f"{node0.addr}:" in err1), err1[-3000:]
    assert "Traceback" not in err1 and "frame #" not in err1
    print(f"MEASURE master killed: rank 1 {end1 - killed:.1f} s")
    assert intact(out, newest + 2)


def test_link_down_at_start_up_stops_both_naming_the_master(hosts, engine_cache, tmp_path):
    node0, node1 = hosts
    hosts.link_down(node1)
    started = time.monotonic()
    run = Run(hosts, engine_cache, tmp_path / "out", ["--startup_timeout", str(STARTUP_TIMEOUT)])
    results = run.wait(STARTUP_TIMEOUT + MARGIN_S + 60)  # + the imports before start-up begins
    for rank, (code, end, err) in enumerate(results):
        assert code == 2, err[-3000:]
        assert end - started < STARTUP_TIMEOUT + MARGIN_S + 60
        side = "waiting for the other ranks" if rank == 0 else f"reaching the master at {node0.addr}:{PORT}"
        assert (f"error: start-up did not finish in {STARTUP_TIMEOUT} s (--startup_timeout): rank {rank} of 2 was "
                f"joining the process group, {side}. Check that all 2 ranks were started; that "
                f"MASTER_ADDR={node0.addr} is the master host's address") in err, err[-3000:]
        assert "Traceback" not in err and "frame #" not in err
        print(f"MEASURE start-up rank {rank}: {end - started:.1f} s")
