"""DeepSpeed's op builds (engine/runtime/op_builds.py): the cache folder per environment, the line before a
build, and the lock of a build: a stale one is removed (our cache) or named in a UserError (the user's
folder), a live one is waited for at most the given time. tests/helpers/op_locks.py makes the lock a killed
build leaves (and says how that was measured).
"""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from engine.errors import UserError
from engine.runtime import op_builds
from tests.helpers.op_locks import building, child, leave_stale_lock, stop

HOLD = "import os, sys, time; fd = os.open(sys.argv[1], os.O_RDONLY); print('ready', flush=True); time.sleep(60)"


@pytest.fixture
def lock(tmp_path) -> Path:
    folder = tmp_path / "deepspeed_shm_comm"
    folder.mkdir()
    return folder / "lock"


def test_a_killed_builder_leaves_a_lock_that_no_process_holds(lock):
    builder = building(lock)
    assert op_builds.lock_users(lock) == {builder.pid}  # live: it holds the file open
    stop(builder)
    assert lock.exists()  # what every later launch waited on forever
    assert op_builds.lock_users(lock) == set()


def test_a_stale_lock_in_our_cache_is_removed_with_a_line(lock, caplog):
    leave_stale_lock(lock)
    with caplog.at_level(logging.WARNING, logger="engine"):
        start = time.monotonic()
        op_builds.settle_lock(lock, ours=True, wait_s=30)
    assert time.monotonic() - start < 5
    assert not lock.exists()
    assert f"removed {lock}, a lock left by a build of DeepSpeed's deepspeed_shm_comm op" in caplog.text


def test_a_stale_lock_in_the_users_folder_is_a_user_error_naming_it(lock):
    leave_stale_lock(lock)
    with pytest.raises(UserError, match=f"{lock} is a lock left by .* remove it: rm {lock}$"):
        op_builds.settle_lock(lock, ours=False, wait_s=30)
    assert lock.exists()  # not ours to remove: another machine may build into a shared folder


def test_a_live_build_is_waited_for_at_most_the_bound(lock, caplog):
    lock.touch()
    holder = child(HOLD, str(lock))
    try:
        start = time.monotonic()
        with caplog.at_level(logging.WARNING, logger="engine"), \
                pytest.raises(UserError, match=f"has held {lock} for over 1 s \\(processes {holder.pid}\\)"):
            op_builds.settle_lock(lock, ours=True, wait_s=1)
        assert 1 <= time.monotonic() - start < 10
        assert f"waiting for another process ({holder.pid})" in caplog.text
        assert lock.exists()  # a live build's lock is never removed
    finally:
        stop(holder)
    op_builds.settle_lock(lock, ours=True, wait_s=1)  # its holder gone: stale now
    assert not lock.exists()


def test_the_wait_ends_when_the_build_does(lock):
    lock.touch()
    holder = child(HOLD, str(lock))
    remover = subprocess.Popen([sys.executable, "-c", f"import os, time; time.sleep(0.3); os.remove({str(lock)!r})"])
    try:
        op_builds.settle_lock(lock, ours=False, wait_s=30)
        assert not lock.exists()
    finally:
        remover.wait(timeout=30)
        stop(holder)


def test_a_process_running_in_the_build_folder_counts_as_the_build(lock):
    lock.touch()  # a killed builder's orphaned ninja keeps compiling in the folder
    ninja = child("import time; print('ready', flush=True); time.sleep(60)", cwd=lock.parent)
    try:
        assert op_builds.lock_users(lock) == {ninja.pid}
    finally:
        stop(ninja)


def test_the_cache_is_one_folder_per_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path))
    here = op_builds.extensions_dir()
    assert here.parent == tmp_path / "torch_extensions" and here == op_builds.extensions_dir()
    monkeypatch.setattr(sys, "prefix", "/somewhere/else/venv")
    assert op_builds.extensions_dir() != here


def test_install_keeps_the_users_folder_and_sets_ours_otherwise(monkeypatch, tmp_path):
    monkeypatch.setattr("engine.runtime.ds_private.hook_op_builds", lambda before: None)
    monkeypatch.setenv("RLHF_ENGINE_CACHE", str(tmp_path))
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", "/my/ops")
    op_builds.install()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == "/my/ops"
    monkeypatch.delenv("TORCH_EXTENSIONS_DIR")
    op_builds.install()
    assert os.environ["TORCH_EXTENSIONS_DIR"] == str(op_builds.extensions_dir())


def test_a_build_is_announced_only_when_the_op_is_not_built(monkeypatch, tmp_path, caplog):
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path))
    monkeypatch.delenv("LOCAL_RANK", raising=False)
    (tmp_path / "cpu_adam").mkdir()
    with caplog.at_level(logging.WARNING, logger="engine"):
        op_builds.before_build("cpu_adam")
        assert "compiling DeepSpeed's cpu_adam op for this environment, about a minute, once per environment" \
            in caplog.text
        caplog.clear()
        (tmp_path / "cpu_adam" / "cpu_adam.so").touch()
        op_builds.before_build("cpu_adam")
        assert caplog.text == ""


def test_a_lock_released_while_the_scan_runs_is_not_judged_stale(lock, monkeypatch):
    # torch closes its lock file before it removes it; a scan of /proc that starts before the close and
    # ends after it finds no holder, though the lock is live and about to go.
    lock.touch()

    def released_during_the_scan(path):
        path.unlink()
        return set()

    monkeypatch.setattr(op_builds, "lock_users", released_during_the_scan)
    op_builds.settle_lock(lock, ours=False, wait_s=30)  # was: a UserError naming a lock that no longer existed
