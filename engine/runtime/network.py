"""The master address and the network interface of a run across machines, checked before the rendezvous.

Two set-ups otherwise fail late and obscurely: a MASTER_ADDR this host cannot resolve or route to (torch retries
until its store timeout, then prints a traceback), and a host whose own name resolves to a loopback address (the
`127.0.1.1 <hostname>` line Debian and Ubuntu write to /etc/hosts): gloo then listens on loopback, the other
hosts can never connect to it, and every rank hangs. The fix for the second is what the user would do by hand:
GLOO_SOCKET_IFNAME set to the interface that leads to MASTER_ADDR.
"""
from __future__ import annotations

import errno
import ipaddress
import logging
import os
import re
import socket
import threading
from pathlib import Path

import psutil
import torch

from engine.errors import UserError
from engine.runtime import watchdog

logger = logging.getLogger("engine")

NO_ROUTE = (errno.ENETUNREACH, errno.EHOSTUNREACH)
WORLD_KEY = "rlhf_engine/world_size"  # in the rendezvous store, beside torch's own (prefixed) keys
_server = None  # rank 0's rendezvous store, started by check_world_size; torch's own store shares its server


def check_master(env: dict[str, str] | os._Environ = os.environ) -> None:
    """Refuse a MASTER_ADDR that does not resolve or has no route from here; where this host's name resolves
    to loopback and GLOO_SOCKET_IFNAME is unset, set it to the interface that leads to MASTER_ADDR."""
    addr = env.get("MASTER_ADDR", "")
    if int(env.get("WORLD_SIZE", "1") or 1) <= 1 or not addr:
        return
    ip = resolve(addr)
    if ipaddress.ip_address(ip).is_loopback:
        return  # one machine
    source = route_source(addr, ip, int(env.get("MASTER_PORT", "0") or 0))
    if "GLOO_SOCKET_IFNAME" not in env and hostname_is_loopback():
        name = interface_of(source)
        if name:
            env["GLOO_SOCKET_IFNAME"] = name
            logger.info("host name %s resolves to a loopback address: gloo uses interface %s (the route to "
                        "MASTER_ADDR %s); set GLOO_SOCKET_IFNAME to choose another", socket.gethostname(), name, addr)


def check_world_size(env: dict[str, str] | os._Environ = os.environ, wait_s: float = 600.0) -> None:
    """Across machines, under a launcher that sets WORLD_SIZE per node (SLURM, mpirun, by hand, DeepSpeed's
    with a hostfile per node; not torchrun, whose agents agree first): rank 0 starts the rendezvous store here
    and puts its WORLD_SIZE there; every other rank compares its own in a background thread while the main
    thread joins as usual, so a node started with another world size stops at once with one line instead of
    waiting in the rendezvous, and nothing waits longer than before. Call it after the port check (rank 0 then
    holds the port)."""
    if env.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true":
        return
    addr, port = env.get("MASTER_ADDR", ""), int(env.get("MASTER_PORT", "0") or 0)
    rank, world = int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or not addr or port <= 0 or ipaddress.ip_address(resolve(addr)).is_loopback:
        return
    global _server
    if rank == 0:
        # multi_tenant, as torch's env:// rendezvous makes its store: that store then shares this server.
        _server = _store(addr, port, world, True, wait_s)
        _server.set(WORLD_KEY, str(world))
        return
    threading.Thread(target=_compare_world_size, args=(addr, port, rank, world, wait_s), daemon=True,
                     name="world-size-check").start()


def release_world_size_store() -> None:
    """Drop rank 0's reference to the store `check_world_size` started, once the process group has joined: torch's
    env:// store shares its server and keeps it up while the group lives (the other ranks may still be reading
    the world size), and it then stops with the group rather than in the interpreter's teardown. Held here until
    exit, a two-host join that ended with a clean destroy_process_group sometimes aborted at exit
    ("terminate called without an active exception", status -6, on rank 1): 7 of 53 runs of
    tests/multihost/test_bad_setups.py's loopback test before, 0 of 60 after (2026-12-07). Which of torch's
    teardown paths aborted was not pinned down."""
    global _server
    _server = None


def _store(addr: str, port: int, world: int, is_master: bool, wait_s: float):
    from datetime import timedelta

    return torch.distributed.TCPStore(addr, port, world, is_master=is_master, multi_tenant=True,
                                      wait_for_workers=False, timeout=timedelta(seconds=wait_s))


def _compare_world_size(addr: str, port: int, rank: int, world: int, wait_s: float) -> None:
    try:
        theirs = int(_store(addr, port, world, False, wait_s).get(WORLD_KEY))
    except (RuntimeError, ValueError):
        return  # rank 0 not reached (its own timeout and message follow in the main thread), or no number there
    if theirs != world:
        watchdog.stop_process(2, f"this rank (RANK {rank} on host {socket.gethostname()}) was started with "
                                 f"WORLD_SIZE {world}, rank 0 (MASTER_ADDR {addr}) with {theirs}: start every node "
                                 "with the same number of nodes and ranks per node")


def resolve(addr: str) -> str:
    """MASTER_ADDR's IP address as this host resolves it; a UserError naming the host where it does not."""
    try:
        return socket.getaddrinfo(addr, None, type=socket.SOCK_STREAM)[0][4][0]
    except (socket.gaierror, UnicodeError):
        raise UserError(f"MASTER_ADDR {addr!r} (the master address: deepspeed/torchrun --master_addr) does not "
                        f"resolve on host {socket.gethostname()}: give the first node's name as every node knows "
                        "it (/etc/hosts or DNS) or its IP address") from None


def route_source(addr: str, ip: str, port: int) -> str:
    """The local address traffic to `ip` leaves from (a UDP connect sends nothing); a UserError where there
    is no route at all."""
    family = socket.AF_INET6 if ":" in ip else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as s:
        try:
            s.connect((ip, port or 9))
        except OSError as err:
            if err.errno not in NO_ROUTE:
                raise
            raise UserError(f"MASTER_ADDR {addr} ({ip}) cannot be reached from host {socket.gethostname()}: "
                            f"{os.strerror(err.errno)}; give the address of the first node on a network every "
                            "node shares (deepspeed/torchrun --master_addr)") from None
        return s.getsockname()[0]


def hostname_is_loopback() -> bool:
    """Whether this host's own name resolves to a loopback address (or not at all): gloo's default choice."""
    try:
        ip = socket.getaddrinfo(socket.gethostname(), None, type=socket.SOCK_STREAM)[0][4][0]
    except socket.gaierror:
        return True
    return ipaddress.ip_address(ip).is_loopback


def interface_of(address: str) -> str | None:
    """The name of the interface that holds `address`, or None."""
    for name, addrs in psutil.net_if_addrs().items():
        if any(a.address.split("%")[0] == address for a in addrs):
            return name
    return None


def read_hostfile(path: Path) -> list[tuple[str, int]]:
    """(host, slots) per node of a DeepSpeed hostfile (`<host> slots=<ranks>` a line, `#` comments); a
    UserError naming the file and line where it cannot be read or a host does not resolve here (DeepSpeed's
    runner would otherwise start the other nodes, which then wait for the missing one until a timeout)."""
    if not path.is_file():
        raise UserError(f"hostfile {path} not found: write one line per node, '<host> slots=<ranks>', and name it "
                        "with HOSTFILE=... (deepspeed --hostfile)")
    nodes = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        fields = line.split("#", 1)[0].split()
        if not fields:
            continue
        if len(fields) != 2 or not re.fullmatch(r"slots=[1-9]\d*", fields[1]):
            raise UserError(f"hostfile {path} line {number} ({line.strip()!r}) is not '<host> slots=<ranks>': "
                            "write one node per line, e.g. 'worker-1 slots=8'")
        try:
            socket.getaddrinfo(fields[0], None, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError):
            raise UserError(f"hostfile {path} line {number} names host {fields[0]!r}, which does not resolve on "
                            f"this machine ({socket.gethostname()}): correct the name or add it to /etc/hosts (or "
                            "DNS) on every node") from None
        nodes.append((fields[0], int(fields[1].split("=")[1])))
    if not nodes:
        raise UserError(f"hostfile {path} names no node: write one line per node, '<host> slots=<ranks>'")
    return nodes
