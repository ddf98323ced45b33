"""Multi-node set-ups that cannot work, across real hosts: each rank says why in one line, in seconds, instead
of waiting for a timeout; and a host whose name resolves to loopback (Debian's `127.0.1.1 <hostname>`) works."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, offline_env
from tests.helpers import netns

pytestmark = pytest.mark.multihost

# A rank as a cluster's own launcher starts it (SLURM, mpirun: RANK, WORLD_SIZE, MASTER_ADDR in the environment).
JOIN = ("from engine.runtime.distributed import init_distributed, all_reduce_sum; import os\n"
        "info = init_distributed(1)\n"
        "print('sum', all_reduce_sum([info.rank + 1.0], info.device)[0], os.environ.get('GLOO_SOCKET_IFNAME'))\n"
        "import torch; torch.distributed.barrier(); torch.distributed.destroy_process_group()")


def _rank_env(engine_cache, rank: int, master: str, world: int = 2) -> dict[str, str]:
    return offline_env(engine_cache) | {"RANK": str(rank), "LOCAL_RANK": "0", "WORLD_SIZE": str(world),
                                        "MASTER_ADDR": master, "MASTER_PORT": "29500", "PYTHONPATH": str(ROOT)}


def test_unknown_or_unroutable_master_is_named_at_once(hosts, engine_cache, tmp_path):
    """A rank told a master name no host knows, or an address on no network it has, exits 2 with one line."""
    step1 = [sys.executable, str(ROOT / "step1_sft/main.py"), "--output_dir", str(tmp_path / "out")]
    runs = {master: hosts[1].popen(step1, env=_rank_env(engine_cache, 1, master), cwd=ROOT, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, text=True) for master in ("node7", "10.99.0.1")}
    outputs = {master: proc.communicate(timeout=120)[0] for master, proc in runs.items()}
    for master, proc in runs.items():
        assert proc.returncode == 2 and "Traceback" not in outputs[master], outputs[master][-3000:]
    assert "error: MASTER_ADDR 'node7' (the master address: deepspeed/torchrun --master_addr) does not resolve " \
           "on host node1" in outputs["node7"]
    assert "error: MASTER_ADDR 10.99.0.1 (10.99.0.1) cannot be reached from host node1: Network is unreachable" \
           in outputs["10.99.0.1"]
    assert not (tmp_path / "out").exists()


def test_hosts_whose_names_resolve_to_loopback_still_join(hosts, engine_cache):
    """gloo listens on the address the host's own name resolves to: on loopback the other host could never
    connect (every rank hangs); the engine picks the interface that leads to the master instead."""
    for h in hosts:  # as Debian writes /etc/hosts: the host's own name on 127.0.1.1
        (netns.NETNS_ETC / h.ns / "hosts").write_text(
            f"127.0.0.1 localhost\n127.0.1.1 {h.name}\n{hosts[0].addr} master\n")
    procs = [h.popen([sys.executable, "-c", JOIN], env=_rank_env(engine_cache, h.index, "master"), cwd=ROOT,
                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for h in hosts]
    try:
        outputs = [proc.communicate(timeout=90)[0] for proc in procs]
    except subprocess.TimeoutExpired:
        pytest.fail("the ranks hung: gloo listened on loopback")
    for proc, out in zip(procs, outputs, strict=True):
        assert proc.returncode == 0 and "sum 3.0 eth0" in out, out[-3000:]


def test_a_node_started_with_another_world_size_is_named(hosts, engine_cache, tmp_path):
    """node1 believes in 3 ranks, node0 (rank 0) in 2: node1's rank says so at once instead of waiting in the
    rendezvous for a rank 2 that never comes (rank 0 then waits for rank 1 until its start-up timeout)."""
    step1 = [sys.executable, str(ROOT / "step1_sft/main.py"), "--output_dir", str(tmp_path / "out")]
    ranks = [h.popen(step1, env=_rank_env(engine_cache, h.index, "node0", world), cwd=ROOT, stdout=subprocess.PIPE,
                     stderr=subprocess.STDOUT, text=True) for h, world in zip(hosts, (2, 3), strict=True)]
    try:
        out = ranks[1].communicate(timeout=90)[0]
    finally:
        hosts.kill(hosts[0])
    assert ranks[1].returncode == 2 and "Traceback" not in out, out[-3000:]
    assert ("error: this rank (RANK 1 on host node1) was started with WORLD_SIZE 3, rank 0 (MASTER_ADDR node0) with "
            "2: start every node with the same number of nodes and ranks per node") in out, out[-3000:]
