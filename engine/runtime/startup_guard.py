"""A bound on start-up: joining the rendezvous, creating the process group, starting the peer watchdog.

Without it a rank whose master is unreachable waits for torch's store timeout (DeepSpeed's 10 minutes, set by
DEEPSPEED_TIMEOUT), then prints a C++ traceback; and a connection whose link went down mid-handshake blocks
until the kernel gives up retransmitting (about 15 minutes). `guard(timeout)` runs the start-up under a thread
of its own: a rank not through in `timeout` seconds prints one line naming the master address and what to
check, and exits with status 2 (a set-up problem, like bad input). A communication error raised inside
becomes the same message, as a UserError. Time this process spends building one of DeepSpeed's ops
(`paused()`) does not count: a cold build takes a minute or more and has nothing to do with the network.

While it waits, torch's store client logs every failed connection attempt from C++, each with a C++ stack
("Exception raised from ... frame #0 ..."): pages of it for one unreachable address. So stderr (file
descriptor 2, which C++ writes to) is held in a temporary file during start-up (`HeldStderr`): a start-up
that succeeds writes it all out unchanged, one that fails without torch's log lines, before its one line.
"""
from __future__ import annotations

import os
import re
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

from engine.errors import UserError
from engine.runtime import watchdog

POLL_S = 0.2
# torch's C++ log lines (`[W1207 06:49:22.276213071 socket.cpp:764] ...`) and the stack that follows each.
TORCH_LOG = re.compile(r"^(\[[IWEF]\d{4} \d|Exception raised from |frame #\d+: |<omitting python frames>|\s*$)")


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


class HeldStderr:
    """File descriptor 2 goes to a temporary file until `release`."""

    def __init__(self):
        sys.stderr.flush()
        self.saved = os.dup(2)
        self.file = tempfile.TemporaryFile()
        os.dup2(self.file.fileno(), 2)
        self.lock = threading.Lock()  # the guard's thread may release while the main thread does
        self.held = True

    def release(self, drop_torch_log: bool = False) -> None:
        """Put fd 2 back and write out what it held (less torch's C++ log lines with `drop_torch_log`)."""
        with self.lock:
            if not self.held:
                return
            self.held = False
            sys.stderr.flush()
            os.dup2(self.saved, 2)
            os.close(self.saved)
            self.file.seek(0)
            text = self.file.read().decode(errors="replace")
            self.file.close()
        if drop_torch_log:
            text = "".join(line for line in text.splitlines(keepends=True) if not TORCH_LOG.match(line))
        if text:
            sys.stderr.write(text)
            sys.stderr.flush()


class StartupGuard:
    """Counts the seconds of start-up, less the paused ones, on a thread of its own."""

    def __init__(self, timeout: float, poll_s: float = POLL_S):
        self.timeout, self.poll_s = timeout, poll_s
        self.spent = 0.0
        self.pauses = 0  # nesting depth of `paused()`; changed by the main thread only
        self.what = "joining the process group"
        self.done = threading.Event()
        self.stderr = HeldStderr()
        self.thread = threading.Thread(target=self._run, name="startup-guard", daemon=True)

    def release_before_stop(self) -> None:
        """Put the held stderr back, less torch's log lines, before a stop (`watchdog.before_stop`): the file
        held now, which `paused()` may have replaced since the guard began."""
        self.stderr.release(drop_torch_log=True)

    def _run(self) -> None:
        last = time.monotonic()
        while not self.done.wait(self.poll_s):
            now = time.monotonic()
            if not self.pauses:
                self.spent += now - last
            last = now
            if self.spent >= self.timeout:
                watchdog.stop_process(2, message(self.spent, self.what))  # releases stderr (`before_stop`)
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
    # Any thread may stop the process during start-up (this guard's, the world-size check's in
    # engine/runtime/network.py): its line must reach the real stderr, not the held file.
    release = _active.release_before_stop
    watchdog.before_stop.append(release)
    _active.thread.start()
    failed = False
    try:
        yield _active
    except Exception as err:
        if not watchdog.collective_error(err):
            raise
        failed = True
        raise UserError(f"{message(None, _active.what)} ({watchdog.one_line(err)})") from None
    finally:
        watchdog.before_stop.remove(release)
        _active.done.set()
        _active.stderr.release(drop_torch_log=failed)
        _active = None


@contextmanager
def paused() -> Iterator[None]:
    """Time inside does not count toward the start-up limit (no-op outside `guard`)."""
    active = _active
    if active is None:
        yield
        return
    active.pauses += 1
    if active.pauses == 1:
        active.stderr.release()  # a build announces itself and may print compiler output: let it through
    try:
        yield
    finally:
        active.pauses -= 1
        if active.pauses == 0:
            active.stderr = HeldStderr()
