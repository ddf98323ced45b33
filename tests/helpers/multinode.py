"""Launch a step across the hosts of tests/helpers/netns.py the way users do: `torchrun` on every node, or
DeepSpeed's launcher with a hostfile (its pdsh runner, over ssh between the hosts)."""
from __future__ import annotations

import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from tests.helpers.netns import Hosts

ROOT = Path(__file__).resolve().parents[2]
MASTER_PORT = 29500  # every host has its own ports: the launcher's default is free in a fresh namespace
# What a rank launched over ssh must inherit (DeepSpeed's runner passes PYTHON* itself, the rest by its env file).
REMOTE_ENV = ("RLHF_ENGINE_CACHE", "HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TOKENIZERS_PARALLELISM", "OMP_NUM_THREADS",
              "TORCH_EXTENSIONS_DIR", "RLHF_ENGINE_FAULT")


@dataclass
class NodeResult:
    """One node's launcher: its exit status and console (stdout and stderr together)."""

    host: str
    returncode: int
    output: str


def torchrun(hosts: Hosts, script: str, args: list[str], env: dict[str, str], folder: Path, nproc: int = 1,
             timeout: float = 600, extra_env: dict[str, dict[str, str]] | None = None,
             grace: float = 60) -> list[NodeResult]:
    """`torchrun --nnodes N --node_rank i --master_addr node0` on every host at once; waits for all, but kills
    the others `grace` seconds after one node failed (torchrun's agents can wait minutes for a lost peer).
    `extra_env`: {host name: variables} added for that host only."""
    folder.mkdir(parents=True, exist_ok=True)
    procs = []
    for h in hosts:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", str(len(hosts)), "--node_rank",
               str(h.index), "--nproc_per_node", str(nproc), "--master_addr", hosts[0].name, "--master_port",
               str(MASTER_PORT), str(ROOT / script), "--disable_tqdm", *args]
        log = open(folder / f"{h.name}.log", "w")  # closed in _finish
        node_env = dict(env, **(extra_env or {}).get(h.name, {}))
        procs.append((h, log, h.popen(cmd, env=node_env, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)))
    deadline, failed_at = time.monotonic() + timeout, None
    while time.monotonic() < deadline and any(proc.poll() is None for _, _, proc in procs):
        if failed_at is None and any(proc.poll() not in (None, 0) for _, _, proc in procs):
            failed_at = time.monotonic()
            deadline = min(deadline, failed_at + grace)
        time.sleep(0.5)
    return [_finish(h, log, proc, folder, deadline) for h, log, proc in procs]


def one_host(hosts: Hosts, script: str, args: list[str], env: dict[str, str], folder: Path, nproc: int = 2,
             timeout: float = 600) -> NodeResult:
    """The same world size on one host (the first): `torchrun --nproc_per_node nproc` in its namespace, so its
    ports are that host's own and cannot collide with other tests on this machine."""
    return torchrun([hosts[0]], script, args, env, folder, nproc=nproc, timeout=timeout)[0]


def _finish(host, log, proc: subprocess.Popen, folder: Path, deadline: float) -> NodeResult:
    try:
        proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
    log.close()
    return NodeResult(host.name, proc.returncode, (folder / f"{host.name}.log").read_text())


def deepspeed_hostfile(hosts: Hosts, script: str, args: list[str], env: dict[str, str], folder: Path,
                       slots: int = 1, timeout: float = 600) -> NodeResult:
    """`deepspeed --hostfile <file> script` started on the first host, which reaches every host over ssh
    (pdsh); sshd is started in the hosts if it is not running. The launched ranks get `env`'s REMOTE_ENV
    variables through DeepSpeed's env file (DS_ENV_FILE) and PYTHONPATH through its own export."""
    folder.mkdir(parents=True, exist_ok=True)
    if hosts.ssh_env is None:
        hosts.start_sshd(folder / "ssh")
    hostfile = folder / "hostfile"
    hostfile.write_text("".join(f"{h.name} slots={slots}\n" for h in hosts))
    env_file = folder / "deepspeed_env"
    env_file.write_text("".join(f"{k}={env[k]}\n" for k in REMOTE_ENV if env.get(k)))
    # HOME: DeepSpeed's runner also reads ~/.deepspeed_env; a folder of the test's own keeps the user's out.
    run_env = dict(env, **hosts.ssh_env, DS_ENV_FILE=str(env_file), HOME=str(folder))
    cmd = ["deepspeed", "--hostfile", str(hostfile), "--master_addr", hosts[0].name, "--master_port",
           str(MASTER_PORT), str(ROOT / script), "--disable_tqdm", *args]
    proc = hosts[0].run(cmd, env=run_env, cwd=ROOT, timeout=timeout, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    return NodeResult(hosts[0].name, proc.returncode, proc.stdout)
