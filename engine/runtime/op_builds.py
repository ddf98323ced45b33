"""DeepSpeed's one-time op builds: a cache per environment, a line before a build, no wait on a dead lock.

DeepSpeed compiles its C++ ops on first use (the CPU communication op at every CPU start-up, cpu_adam with
--offload, ...) through torch.utils.cpp_extension, into $TORCH_EXTENSIONS_DIR/<op>/. The builder creates
`<op>/lock`, holds it open while gcc and ninja run (about a minute on 2 cores) and removes it when done;
every other process waits while the file exists, with no message and no time limit. A process stopped
mid-build (SIGTERM from `timeout`, `kill`, a scheduler) leaves the file behind, and then every later launch
waits forever. Measured (torch 2.13, DeepSpeed 0.19.8): after a SIGTERM to the building process the lock
is an empty file that no process holds open, while its orphaned ninja may still compile in the folder.

So, before DeepSpeed builds or loads an op (`before_build`, hooked in by `install`):
- a lock that no process on this machine holds open, and in whose folder nothing runs, is stale. In this
  environment's own cache it is removed with a logged line; in a folder the user chose with
  TORCH_EXTENSIONS_DIR (which other machines may share) the run stops with a UserError naming the file;
- a live build is waited for, with a logged line, at most LOCK_WAIT_S;
- a build is announced with one line.
The cache is one folder per environment (`extensions_dir`): torch's default is shared by every virtual
environment of one Python version, and two environments with other torch or DeepSpeed builds rebuild each
other's ops at almost every launch.
"""
from __future__ import annotations

import hashlib
import importlib.metadata
import logging
import os
import socket
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from engine.errors import UserError
from engine.runtime.atomic import cache_root

logger = logging.getLogger("engine")

# The longest a live build may hold the lock before a waiting process stops. Cold CPU builds measured
# 28-69 s on 2 cores (docs/reliability.md, "Start-up"); CUDA builds of the larger ops take several minutes.
LOCK_WAIT_S = 900.0
POLL_S = 0.5


def extensions_dir() -> Path:
    """This environment's op cache: <cache root>/torch_extensions/<python, torch, DeepSpeed versions>-<hash of the
    environment's prefix, those versions and this machine's name>. The machine name keeps a cache on a shared
    home folder per machine, so a lock found there is held, if at all, by a process this machine can see."""
    import torch

    try:
        ds = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        ds = "none"
    py = f"py{sys.version_info.major}{sys.version_info.minor}"
    key = "\n".join([sys.prefix, py, torch.__version__, ds, socket.gethostname()])
    digest = hashlib.sha256(key.encode()).hexdigest()[:10]
    return cache_root() / "torch_extensions" / f"{py}-torch{torch.__version__}-ds{ds}-{digest}"


def install() -> None:
    """Point TORCH_EXTENSIONS_DIR at this environment's cache unless the user set it, and hook `before_build`
    into DeepSpeed's op loader. Call before DeepSpeed loads any op (init_distributed does)."""
    from engine.runtime.ds_private import hook_op_builds

    if not os.environ.get("TORCH_EXTENSIONS_DIR"):
        os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())
    hook_op_builds(before_build)


def before_build(op: str) -> None:
    """Clear or wait out the lock of `op`'s build folder, then announce a build when the op is not built."""
    root = os.environ.get("TORCH_EXTENSIONS_DIR")
    if not root:  # torch's default folder: not ours to judge
        return
    folder = Path(root) / op
    settle_lock(folder / "lock", ours=Path(root) == extensions_dir())
    if not (folder / f"{op}.so").is_file() and os.environ.get("LOCAL_RANK", "0") == "0":
        logger.warning("compiling DeepSpeed's %s op for this environment, about a minute, once per environment "
                       "(into %s)", op, folder)


def settle_lock(lock: Path, ours: bool, wait_s: float = LOCK_WAIT_S) -> None:
    """Return once `lock` is gone or removed as stale (see the module docstring); wait at most `wait_s`
    for a live build, then raise a UserError."""
    deadline = time.monotonic() + wait_s
    told = False
    suspect = None  # the lock file (identity) that no process held at the last poll
    while lock.exists():
        with _judging(lock):  # one process of a job judges and removes at a time
            if not lock.exists():
                return
            seen = _identity(lock)
            users = lock_users(lock)
            if users == set() or (users is None and _age(lock) > wait_s):
                # torch closes the lock before it removes it, and a scan of /proc outlasts that gap: only a
                # file found unheld at two polls in a row is stale (a live one is removed within the poll).
                if suspect is not None and suspect == seen == _identity(lock):
                    _stale(lock, ours)
                    return
                suspect = seen
            else:
                suspect = None
        if time.monotonic() > deadline:
            raise UserError(f"a DeepSpeed op build has held {lock} for over {wait_s:.0f} s (processes "
                            f"{_pids(users)}); if it is stuck, stop them, remove the file (rm {lock}) and run again")
        if not told and suspect is None:
            logger.warning("waiting for another process (%s) to finish building DeepSpeed's %s op (lock %s), at most "
                           "%.0f s", _pids(users), lock.parent.name, lock, wait_s)
            told = True
        time.sleep(POLL_S)


def lock_users(lock: Path) -> set[int] | None:
    """The processes on this machine that hold `lock` open (the builder) or run inside its folder (the
    builder's ninja and compilers, which outlive a killed builder); None where /proc cannot tell."""
    proc = Path("/proc")
    if not (proc / "self" / "fd").is_dir():
        return None
    target, folder = os.path.realpath(lock), os.path.realpath(lock.parent)
    users = set()
    for entry in proc.iterdir():
        if entry.name.isdigit() and entry.name != str(os.getpid()) and _uses(entry, target, folder):
            users.add(int(entry.name))
    return users


def _uses(process: Path, target: str, folder: str) -> bool:
    try:
        if os.readlink(process / "cwd") == folder:
            return True
        return any(os.readlink(fd) == target for fd in (process / "fd").iterdir())
    except OSError:  # the process ended, or belongs to another user (who cannot write our cache)
        return False


@contextmanager
def _judging(lock: Path) -> Iterator[None]:
    """An exclusive flock on `<lock>.check` (the kernel drops it when its holder dies, so it cannot go stale):
    two ranks that both find a stale lock must not both remove one, or the second would remove the lock the
    first one's new build holds."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no judging in parallel to guard
        yield
        return
    with open(lock.with_name(lock.name + ".check"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        yield


def _stale(lock: Path, ours: bool) -> None:
    if not ours:
        raise UserError(f"{lock} is a lock left by a DeepSpeed op build that stopped part-way (no process on this "
                        f"machine holds it); if no other machine builds into that folder, remove it: rm {lock}")
    lock.unlink(missing_ok=True)
    logger.warning("removed %s, a lock left by a build of DeepSpeed's %s op that stopped part-way (no process "
                   "holds it); building it again", lock, lock.parent.name)


def _identity(lock: Path) -> tuple[int, int, int] | None:
    """(device, inode, change time) of `lock`: tells one lock file from the next one made at the same path."""
    try:
        st = lock.stat()
    except FileNotFoundError:
        return None
    return st.st_dev, st.st_ino, st.st_ctime_ns


def _age(lock: Path) -> float:
    try:
        return time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return 0.0


def _pids(users: set[int] | None) -> str:
    return ", ".join(map(str, sorted(users))) if users else "unknown: no /proc here"
