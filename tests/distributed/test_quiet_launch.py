"""The launcher path of a clean run: `e2e_rlhf.py --step 1` (the deepspeed launcher, 2 CPU ranks, a few steps)
under the warning probe. The console keeps no launcher INFO line (the stage's log keeps them all), and no
process (launcher, ranks) shows a warning outside tests/helpers/console_warnings.py's allow-list."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.conftest import ROOT, offline_env
from tests.helpers.console_warnings import probe_env, read_warnings, unexpected

pytestmark = pytest.mark.distributed

LAUNCHER_INFO = ("] [INFO] [runner.py:", "] [INFO] [launch.py:")


def test_two_rank_step_1_console_is_quiet(engine_cache, tmp_path):
    probe, out = tmp_path / "probe", tmp_path / "out"
    probe.mkdir()
    pythonpath = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = offline_env(engine_cache) | probe_env(probe, pythonpath)
    cmd = [sys.executable, str(ROOT / "e2e_rlhf.py"), "--step", "1", "--deployment-type", "cpu", "--output-dir",
           str(out), "--step1-args=--test_stop_step 2 --disable_tqdm"]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    log = (out / "logs" / "step1_sft.log").read_text()
    assert sum(log.count(tag) for tag in LAUNCHER_INFO) >= 8  # the command, world info, one line per rank...
    assert not any(tag in proc.stdout + proc.stderr for tag in LAUNCHER_INFO)
    found = read_warnings(probe)
    assert any("Unable to find hostfile" in w["message"] for w in found)  # the launcher ran under the probe
    assert unexpected(found) == []
