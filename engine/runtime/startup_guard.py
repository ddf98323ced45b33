"""A bound on start-up: joining the rendezvous, creating the process group, starting the peer watchdog.

Without it a rank whose master is unreachable waits for torch's store timeout (DeepSpeed's 10 minutes, set by
DEEPSPEED_TIMEOUT), then prints a C++ traceback; and a connection whose link went down mid-handshake blocks
until the kernel gives up retransmitting (about 15 minutes). `guard(timeout)` runs the start-up under a thread
of its own: a rank not through in `timeout` seconds prints one line naming the master address and what to
check, and exits with status 2 (a set-up problem, like bad input). A communication error raised inside
becomes the same message, as a UserError. Time this process spends building one of DeepSpeed's ops
(`paused()`) does not count: a cold build takes a minute or more and has nothing to do with the network.
"""
from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from engine.errors import UserError
from engine.runtime import watchdog

POLL_S = 0.2


def message(seconds: float | None, what: str) -> str:
    """The one line for a start-up that failed while `what` ('joining the process group', ...): after
    `seconds` (None: at once, on an error)."""
    rank, world = os.environ.get("RANK", "?"), os.environ.get("WORLD_SIZE", "?")
    addr, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), os.environ.get("MASTER_PORT", "?")
    when = f"did not finish in {seconds:.0f} s (--startup_timeout)" if seconds is not None else "failed"
    side = "waiting for the other ranks" if rank == "0" else f"reaching the master at {addr}:{port}"
    return (f"start-up {when}: rank {rank} of {world} was {what}, {side}. Check that all {world} ranks were "
            f"started; that MASTER_ADDR={addr} is the master host's address as this host reaches it, and "
            f"MASTER_PORT={port} a port its firewall lets in; that every host reaches every other on the ports "
            f"the process group opens; and that GLOO_SOCKET_IFNAME (CPU) or NCCL_SOCKET_IFNAME (GPU) names the "
            f"interface that reaches the other hosts")


class StartupGuard:
    """Counts the seconds of start-up, less the paused ones, on a thread of its own."""

    def __init__(self, timeout: float, poll_s: float = POLL_S):
        self.timeout, self.poll_s = timeout, poll_s
        self.spent = 0.0
        self.pauses = 0  # nesting depth of `paused()`; changed by the main thread only
        self.what = "joining the process group"
        self.done = threading.Event()
        self.thread = threading.Thread(target=self._run, name="startup-guard", daemon=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self.done.wait(self.poll_s):
            now = time.monotonic()
            if not self.pauses:
                self.spent += now - last
            last = now
            if self.spent >= self.timeout:
                watchdog.stop_process(2, message(self.spent, self.what))
                return


_active: StartupGuard | None = None


@contextmanager
def guard(timeout: float) -> Iterator[StartupGuard | None]:
    """Run the block under a start-up limit of `timeout` seconds (0: none). A communication error raised in
    it becomes a UserError with the start-up message."""
    global _active
    if timeout <= 0:
        yield None
        return
    _active = StartupGuard(timeout)
    _active.thread.start()
    try:
        yield _active
    except Exception as err:
        if not watchdog.collective_error(err):
            raise
        raise UserError(f"{message(None, _active.what)} ({watchdog.one_line(err)})") from None
    finally:
        _active.done.set()
        _active = None


@contextmanager
def paused() -> Iterator[None]:
    """Time inside does not count toward the start-up limit (no-op outside `guard`)."""
    active = _active
    if active is None:
        yield
        return
    active.pauses += 1
    try:
        yield
    finally:
        active.pauses -= 1
