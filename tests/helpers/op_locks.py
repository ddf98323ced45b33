"""A stale op-build lock made the way a killed build makes it: a child process takes torch's own FileBaton
(what torch.utils.cpp_extension holds while DeepSpeed's op builds) and is stopped with SIGTERM.

Measured once on a real build (DeepSpeed's shm op in a temp TORCH_EXTENSIONS_DIR, SIGTERM 12 s in; torch
2.13, DeepSpeed 0.19.8): the same state, an empty `lock` that no process holds open, with `build.ninja` and
some object files beside it and no `.so`; the orphaned ninja went on compiling in the folder for a while.
"""
from __future__ import annotations

import signal
import subprocess
import sys
from pathlib import Path

from torch.utils import file_baton

# torch's FileBaton, loaded from its file without importing torch (seconds per child otherwise).
BUILDER = ("import importlib.util, sys, time; spec = importlib.util.spec_from_file_location('fb', sys.argv[2]); "
           "fb = importlib.util.module_from_spec(spec); spec.loader.exec_module(fb); "
           "assert fb.FileBaton(sys.argv[1]).try_acquire(); print('ready', flush=True); time.sleep(60)")


def child(code: str, *args: str, cwd: Path | None = None) -> subprocess.Popen:
    """A Python child running `code`, once it has printed 'ready'."""
    proc = subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, text=True, cwd=cwd)
    assert proc.stdout.readline().strip() == "ready"
    return proc


def stop(proc: subprocess.Popen) -> None:
    """SIGTERM, what `timeout`, `kill` and schedulers send."""
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=30)
    proc.stdout.close()


def building(lock: Path) -> subprocess.Popen:
    """A process holding `lock` as torch's builder does."""
    lock.parent.mkdir(parents=True, exist_ok=True)
    return child(BUILDER, str(lock), file_baton.__file__)


def leave_stale_lock(lock: Path) -> None:
    stop(building(lock))
