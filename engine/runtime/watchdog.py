"""Peer watchdog: when one rank dies or raises, the others stop within --peer_timeout seconds, naming it.

A collective waits for every rank; if one rank is gone the others would wait for the process group's
timeout (30 minutes under DeepSpeed), or forever where no launcher tears the group down (one process per
node). Each rank runs a daemon thread that, every POLL_S seconds, bumps its own heartbeat counter in a
TCPStore of our own and reads the others'. A peer is presumed gone when

- it posted `failed/<rank>` (run_main does so when the rank raises): "rank 1 failed: <reason>";
- its process is gone and it runs on this machine (same boot and pid namespace): "rank 1 (pid P on host H)
  died (killed, or out of memory)", seen within one poll;
- its heartbeat counter has not moved for peer_timeout seconds of this rank's monotonic clock (no clock
  skew between machines): "rank 1 ... sent no heartbeat for N s";
- the store itself is gone (its connection refused or reset): rank 0 hosts it, so rank 0 is gone;
- a store call has not returned for peer_timeout seconds: rank 0's machine, or the link to it, is down. A
  TCP connection whose link is down fails only when the kernel gives up retransmitting (about 15 minutes),
  so a guard thread, never blocked on the store itself, times every store call (`StoreGuard`).

A collective that fails because a peer vanished (gloo's "Connection reset by peer") may be seen by the main
thread before the watchdog sees why: `peer_failure(wait=True)` then waits up to peer_timeout for the
watchdog's verdict, so that the user gets the same message whichever notices first.

The watchdog thread then prints one `error: ...; stopping rank R too` line and calls os._exit: the main
thread may be stuck inside a collective, so a hard exit is the only way out. The exit status is the failed
peer's (2 when it stopped on a UserError, so a bad flag still exits 2 on every rank), else 1.

Start-up (rendezvous, process-group creation, this store) has its own limit, --startup_timeout
(`startup_guard`): a rank that is not through it in time prints one line naming the master address and what
to check, and exits with status 2 (a set-up problem, like bad input).

The store is not the default process group's: under torchrun that one lives in the launcher's agent.
Rank 0 hosts ours on MASTER_ADDR at a free port and tells the others the port by a broadcast right after
the process group is up. A rank that finishes posts `done/<rank>` and keeps watching until every rank has,
then stops its thread before the final barrier, so nobody flags it and no thread touches the store after
rank 0, its host, has exited.
"""
from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import timedelta
from pathlib import Path

# Seconds between heartbeats: well under any sensible --peer_timeout, and a store of 64 ranks then
# serves about 64 * 67 small requests a second.
POLL_S = 1.0
# Substrings (lower case) of the errors a collective raises when a peer vanished: gloo's "Read error ...:
# Connection reset by peer" or "Connection closed by peer", a broken pipe. NCCL's errors are DistErrors.
COLLECTIVE_ERRORS = ("gloo", "nccl", "connection reset", "connection closed", "broken pipe")
# Seconds rank 0 stays up after posting its own failure, so that the others can read the reason from
# its store before the store goes away with it.
LINGER_S = 3.0
# Seconds a stopping rank tries to acknowledge that news before it exits anyway.
ACK_WAIT_S = 1.0
# c10's log level for errors only (`quiet_torch_warnings`).
CPP_LOG_ERROR = 2


class Heartbeats:
    """When each peer's heartbeat counter last moved, on the local monotonic clock (pure bookkeeping)."""

    def __init__(self, peers: list[int], now: float):
        self.last: dict[int, tuple[int, float]] = {p: (-1, now) for p in peers}

    def update(self, peer: int, count: int, now: float) -> None:
        if count != self.last[peer][0]:
            self.last[peer] = (count, now)

    def silent_for(self, peer: int, now: float) -> float:
        return now - self.last[peer][1]

    def stale(self, now: float, timeout: float) -> list[int]:
        """Peers whose counter has not moved for `timeout` seconds."""
        return [p for p in self.last if self.silent_for(p, now) >= timeout]

    def forget(self, peer: int) -> None:
        self.last.pop(peer, None)

    def peers(self) -> list[int]:
        """The peers still watched."""
        return list(self.last)


def machine_id() -> str | None:
    """This boot of this machine and this pid namespace: two ranks with the same id can see each other's
    pids. None off Linux (no fast path then)."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}/{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def process_gone(pid: int) -> bool:
    """Whether process `pid` (in this pid namespace) has exited; a zombie not yet reaped counts as gone."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (OSError, IndexError):
        return False
    return state in ("Z", "X")


def collective_error(err: BaseException) -> bool:
    """Whether `err` may come from a collective or store call that broke because a peer vanished."""
    import torch

    if isinstance(err, torch.distributed.DistError):
        return True
    text = str(err).lower()
    return isinstance(err, (RuntimeError, OSError)) and any(part in text for part in COLLECTIVE_ERRORS)


class StoreGuard:
    """Times the store calls of one Watchdog from a thread of its own, which never touches the store: calls
    `on_timeout(seconds)` once when a call has not returned for `timeout` seconds (the thread that made it
    may be blocked until the kernel gives up on the connection, about 15 minutes)."""

    def __init__(self, timeout: float, poll_s: float, on_timeout: Callable[[float], None]):
        self.timeout, self.poll_s, self.on_timeout = timeout, poll_s, on_timeout
        self.started: float | None = None  # when the store call in flight began; None: none in flight
        self.closed = threading.Event()
        self.thread = threading.Thread(target=self._run, name="peer-watchdog-guard", daemon=True)

    @contextmanager
    def call(self) -> Iterator[None]:
        """Time the store calls inside (callers hold the Watchdog's lock; a nested call keeps the outer start)."""
        outer = self.started is None
        if outer:
            self.started = time.monotonic()
        try:
            yield
        finally:
            if outer:
                self.started = None

    def _run(self) -> None:
        while not self.closed.wait(self.poll_s):
            started = self.started
            if started is not None and time.monotonic() - started >= self.timeout:
                self.on_timeout(time.monotonic() - started)
                return


def one_line(err: BaseException) -> str:
    """`Type: first line of the message`, short enough for one log line."""
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}"[:300]


class Watchdog:
    """One rank's view of its peers, over `store` (a TCPStore shared by the `world_size` ranks)."""

    def __init__(self, store, rank: int, world_size: int, peer_timeout: float, host: str,
                 on_peer_failure=None, poll_s: float = POLL_S):
        self.store, self.rank, self.world_size, self.timeout, self.host = store, rank, world_size, peer_timeout, host
        self.poll_s = min(poll_s, peer_timeout / 4)
        self.on_peer_failure = on_peer_failure or stop_process
        self.heartbeats = Heartbeats([p for p in range(world_size) if p != rank], time.monotonic())
        self.procs: dict[int, tuple[str, int, str]] = {}  # peer -> (machine id, pid, hostname)
        self.me = (machine_id() or "-", os.getpid(), socket.gethostname())
        self.lock = threading.RLock()  # the store client is shared by the thread and the main thread
        self.guard = StoreGuard(peer_timeout, self.poll_s, self._store_timed_out)
        self.stop = threading.Event()
        self.all_done = threading.Event()
        self.posted_done = False
        self.store.set(f"proc/{rank}", " ".join(map(str, self.me)))
        self.thread = threading.Thread(target=self._run, name="peer-watchdog", daemon=True)

    def start(self) -> None:
        self.thread.start()
        self.guard.thread.start()

    @contextmanager
    def _store(self) -> Iterator[None]:
        """Hold the store client, with the call timed by the guard."""
        with self.lock, self.guard.call():
            yield

    def _run(self) -> None:
        try:
            while not self.stop.is_set():
                verdict = self.check()
                if verdict is not None:
                    self.on_peer_failure(*verdict)
                    return
                if self.posted_done and self._count("ndone") >= self.world_size:
                    return
                self.stop.wait(self.poll_s)
        except Exception as err:  # a bug here must not take the training down; say so and stop watching
            print(f"warning: rank {self.rank}: peer watchdog stopped: {one_line(err)}", file=sys.stderr, flush=True)
        finally:
            self.all_done.set()

    def check(self) -> tuple[int, str] | None:
        """(exit status, message) when a peer has failed, died or gone silent; None while all is well."""
        with self._store():
            try:
                return self._check()
            except (RuntimeError, OSError) as err:  # torch's DistNetworkError is a RuntimeError
                if self.rank == 0:
                    raise
                return 1, f"{self._master()} is gone ({one_line(err)}); stopping rank {self.rank} too"

    def _master(self) -> str:
        """Rank 0, named with its pid and host when known, and the address of the store it hosts."""
        known = f"{self._where(0)}, " if 0 in self.procs else ""
        return f"rank 0 ({known}which hosts the watchdog store at {self.host})"

    def _store_timed_out(self, seconds: float) -> None:
        if self.rank == 0:
            message = f"the watchdog store at {self.host}, on this rank, did not answer for {seconds:.0f} s"
        else:
            message = (f"{self._master()} did not answer for {seconds:.0f} s (its machine is down, or the network "
                       f"between this host and it; --peer_timeout sets this limit)")
        self.on_peer_failure(1, f"{message}; stopping rank {self.rank} too")

    def _check(self) -> tuple[int, str] | None:
        self.store.add(f"hb/{self.rank}", 1)
        now = time.monotonic()
        if self._count("nfailed") > 0:
            for peer in self.heartbeats.peers():
                if self.store.check([f"failed/{peer}"]):
                    return self._failed(peer)
        for peer in self.heartbeats.peers():
            self.heartbeats.update(peer, self._count(f"hb/{peer}"), now)
            if peer not in self.procs and self.store.check([f"proc/{peer}"]):
                machine, pid, hostname = self.store.get(f"proc/{peer}").decode().split(" ", 2)
                self.procs[peer] = (machine, int(pid), hostname)
        dead = self._dead()
        for peer in dead + self.heartbeats.stale(now, self.timeout):
            if self.store.check([f"done/{peer}"]):
                self.heartbeats.forget(peer)  # finished normally; it may exit before we do
            elif self.store.check([f"failed/{peer}"]):  # posted just before it exited
                return self._failed(peer)
            elif peer in dead:
                return 1, f"{self._name(peer)} died (killed, or out of memory); stopping rank {self.rank} too"
            else:
                return 1, (f"{self._name(peer)} sent no heartbeat for {self.heartbeats.silent_for(peer, now):.0f} s "
                           f"(hung, or its machine is unreachable; --peer_timeout sets this limit); "
                           f"stopping rank {self.rank} too")
        return None

    def _count(self, key: str) -> int:
        with self._store():
            return self.store.add(key, 0)  # reads a counter without blocking (0 when absent)

    def _dead(self) -> list[int]:
        """Watched peers on this machine whose process is gone."""
        return [p for p, (machine, pid, _) in self.procs.items()
                if p in self.heartbeats.peers() and machine == self.me[0] != "-" and process_gone(pid)]

    def _failed(self, peer: int) -> tuple[int, str]:
        status, reason = self.store.get(f"failed/{peer}").decode().split(" ", 1)
        return int(status), f"rank {peer} failed: {reason}; stopping rank {self.rank} too"

    def _where(self, peer: int) -> str:
        _, pid, hostname = self.procs[peer]
        return f"pid {pid} on host {hostname}"

    def _name(self, peer: int) -> str:
        return f"rank {peer} ({self._where(peer)})" if peer in self.procs else f"rank {peer}"

    def post_failure(self, status: int, reason: str) -> None:
        """Tell the peers this rank is stopping with `status` because of `reason` (one line)."""
        self.stop.set()
        with self._store():
            try:
                self.store.set(f"failed/{self.rank}", f"{status} {reason}")
                self.store.add("nfailed", 1)
            except (RuntimeError, OSError):
                return  # the store (rank 0) is gone already: nobody to tell
        if self.rank == 0:  # the others read the reason from our store: give them a few polls
            deadline = time.monotonic() + LINGER_S
            while time.monotonic() < deadline and self._count("acks") + self._count("nfailed") < self.world_size:
                time.sleep(0.1)

    def acknowledge(self, wait_s: float = ACK_WAIT_S) -> None:
        """Tell rank 0 (lingering after its failure) that this rank has read the news: best effort, for at most
        `wait_s` seconds, on a thread of its own (the store may be unreachable, and the store client held by a
        thread blocked in a call that never returns)."""

        def send() -> None:
            with self._store():
                try:
                    self.store.add("acks", 1)
                except (RuntimeError, OSError):
                    pass

        sender = threading.Thread(target=send, name="peer-watchdog-ack", daemon=True)
        sender.start()
        sender.join(wait_s)

    def finish(self) -> None:
        """This rank is done: keep watching until every rank is, then stop the threads."""
        with self._store():
            try:
                self.store.set(f"done/{self.rank}", "1")
                self.store.add("ndone", 1)
                self.posted_done = True
            except (RuntimeError, OSError):  # the store is gone, so rank 0 is
                verdict = self.check()
                if verdict is not None:
                    self.on_peer_failure(*verdict)
                self.stop.set()
        self.all_done.wait()
        self.stop.set()
        self.thread.join()
        self.guard.closed.set()
        if self.guard.thread.is_alive():
            self.guard.thread.join()


_active: Watchdog | None = None
_exiting = threading.Lock()
# Run by `stop_process` before it prints: the start-up guard's release of stderr, which it holds in a file
# while the process group forms (engine/runtime/startup_guard.py); a line printed there would die with the file.
before_stop: list[Callable[[], None]] = []


def stop_process(status: int, message: str) -> None:
    """Print `error: <message>` and exit hard (the main thread may be inside a collective)."""
    if not _exiting.acquire(blocking=False):
        return  # another thread is already stopping this process
    if _active is not None:
        _active.acknowledge()
    for release in list(before_stop):
        release()
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.stdout.flush()
    os._exit(status)


def quiet_torch_warnings() -> None:
    """torch's C++ warnings off (errors stay) unless TORCH_CPP_LOG_LEVEL is set.

    When a peer's machine goes away, the store client and gloo log a warning with a C++ stack ("Exception
    raised from ... frame #0: ...") for each failed call, pages of them above the watchdog's one line. torch
    reads TORCH_CPP_LOG_LEVEL only when it is imported, before the engine can set it, so this sets the level
    torch read it into (c10's exported FLAGS_caffe2_log_level: 0 info, 1 warning, 2 error); where that symbol
    is not found (another torch build, or not Linux), nothing changes."""
    if os.environ.get("TORCH_CPP_LOG_LEVEL"):
        return
    import ctypes

    import torch

    try:
        c10 = ctypes.CDLL(str(Path(torch.__file__).parent / "lib" / "libc10.so"))  # the copy torch loaded
        ctypes.c_int32.in_dll(c10, "FLAGS_caffe2_log_level").value = CPP_LOG_ERROR
    except (OSError, ValueError):
        pass


def start(rank: int, world_size: int, peer_timeout: float, device) -> None:
    """Start this rank's watchdog; call on every rank right after the default process group is up.
    `device`: the torch.device of this rank's collectives (the port is broadcast on it)."""
    global _active
    import torch  # here, not at the top: engine.errors imports this module and must stay light
    host = os.environ.get("MASTER_ADDR", "127.0.0.1")
    store = None
    if rank == 0:
        store = torch.distributed.TCPStore(host, 0, None, True, timedelta(seconds=peer_timeout),
                                           wait_for_workers=False)
    port = torch.tensor([store.port if store is not None else 0], dtype=torch.int64, device=device)
    torch.distributed.broadcast(port, src=0)
    if store is None:
        store = torch.distributed.TCPStore(host, int(port.item()), None, False, timedelta(seconds=peer_timeout))
    _active = Watchdog(store, rank, world_size, peer_timeout, f"{host}:{int(port.item())}")
    _active.start()
    quiet_torch_warnings()


def peer_failure(wait: bool = False) -> tuple[int, str] | None:
    """(status, message) of a peer failure the watchdog can see, or None (also with no watchdog). `wait`: for
    an error from a collective, which may break a moment before the watchdog can tell why (a killed peer's
    sockets close before its process is gone) or long before (a peer on another machine goes silent):
    keep looking until a verdict or for peer_timeout and two polls."""
    if _active is None:
        return None
    deadline = time.monotonic() + (_active.timeout + 2 * _active.poll_s if wait else 0.0)
    while True:
        try:
            verdict = _active.check()
        except (RuntimeError, OSError):
            verdict = None
        if verdict is not None or time.monotonic() >= deadline:
            return verdict
        time.sleep(_active.poll_s)


def fail(status: int, reason: str) -> None:
    """This rank is stopping on an error: tell the peers (no-op without a watchdog)."""
    if _active is not None:
        _exiting.acquire()  # held already: the watchdog thread is stopping the process, wait for it
        _active.post_failure(status, reason)


def finish() -> None:
    """This rank finished normally: mark it done, wait until every rank is, then synchronize and stop."""
    global _active
    if _active is None:
        return
    import torch

    _active.finish()
    if torch.distributed.is_initialized():
        torch.distributed.barrier()  # rank 0 hosts the store: it exits only after every thread has stopped
    _active = None  # the last reference: on rank 0 this shuts the store down
