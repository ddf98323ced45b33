"""Start-up, end to end (issue 17): a launch after a build killed by SIGTERM runs cleanly or stops with a
message, never hangs; a busy rendezvous port under the deepspeed launcher is one line, not a traceback.
The lock logic itself is tests/unit/test_op_builds.py; the busy port as MASTER_PORT is a case of
tests/helpers/bad_input_cases.py."""
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import pytest

from engine.runtime import op_builds
from tests.conftest import ROOT, offline_env
from tests.helpers.op_locks import leave_stale_lock

pytestmark = pytest.mark.smoke

OP = "deepspeed_shm_comm"  # the op every CPU start-up loads (DeepSpeed's shared-memory collectives)
LAUNCH_TIMEOUT_S = 300  # a hang fails the test instead of the test run


def _launch(env: dict[str, str], out, *launcher: str) -> subprocess.CompletedProcess:
    cmd = [*(launcher or [sys.executable]), str(ROOT / "step1_sft" / "main.py"), "--output_dir", str(out),
           "--test_stop_step", "1", "--disable_tqdm"]
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=LAUNCH_TIMEOUT_S)


@pytest.fixture
def our_cache(engine_cache, tmp_path, monkeypatch) -> tuple[dict[str, str], object]:
    """(environment, this op's folder in the engine's own op cache under a fresh RLHF_ENGINE_CACHE), the op
    copied in from this environment's cache when it is built there, so the launch need not build it."""
    env = offline_env(engine_cache) | {"RLHF_ENGINE_CACHE": str(tmp_path / "cache")}
    env.pop("TORCH_EXTENSIONS_DIR", None)
    monkeypatch.setenv("RLHF_ENGINE_CACHE", env["RLHF_ENGINE_CACHE"])
    folder = op_builds.extensions_dir() / OP
    built = os.path.join(os.environ.get("TORCH_EXTENSIONS_DIR", ""), OP)
    if os.path.isfile(os.path.join(built, f"{OP}.so")):
        shutil.copytree(built, folder, ignore=shutil.ignore_patterns("lock*"))  # copy2 keeps ninja's mtimes
    return env, folder


def test_a_launch_after_a_killed_build_removes_the_stale_lock_and_runs(our_cache, engine_cache, tmp_path):
    env, folder = our_cache
    leave_stale_lock(folder / "lock")
    proc = _launch(env, tmp_path / "out")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"removed {folder / 'lock'}, a lock left by a build of DeepSpeed's {OP} op" in proc.stderr
    assert not (folder / "lock").exists() and (folder / f"{OP}.so").is_file()
    assert (tmp_path / "out" / "config.json").is_file()


def test_a_stale_lock_in_the_users_folder_is_one_line_naming_it(engine_cache, tmp_path):
    lock = tmp_path / "ops" / OP / "lock"
    leave_stale_lock(lock)
    env = offline_env(engine_cache) | {"TORCH_EXTENSIONS_DIR": str(tmp_path / "ops")}
    proc = _launch(env, tmp_path / "out")
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"error: {lock} is a lock left by a DeepSpeed op build that stopped part-way (no process on this machine "
        f"holds it); if no other machine builds into that folder, remove it: rm {lock}")
    assert "Traceback" not in proc.stderr and lock.exists() and not (tmp_path / "out").exists()


def test_a_busy_port_under_the_deepspeed_launcher_is_one_line(engine_cache, tmp_path):
    with socket.socket() as other_job:
        other_job.bind(("127.0.0.1", 0))
        other_job.listen()
        port = other_job.getsockname()[1]
        proc = _launch(offline_env(engine_cache), tmp_path / "out", "deepspeed", "--num_gpus", "1",
                       "--master_port", str(port))
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        f"error: port {port} (MASTER_PORT, the rendezvous port) is in use on this machine"), proc.stderr[-3000:]
    assert "--master_port" in errors[0] and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()
