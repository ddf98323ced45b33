"""The scripts beside the steps refuse a missing local model folder at once, as the steps do (issue 17: `chat.py
--path output/nope` retried the hub for 49.5 s, then blamed the network). The steps' cases are in
tests/helpers/bad_input_cases.py.

Run as a user would, from a folder holding `output/`, online (no HF_HUB_OFFLINE): a hub-shaped path that
reached the hub would retry it (here, with no network) or fail later with a hub message.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from tests.conftest import ROOT, offline_env

pytestmark = pytest.mark.smoke

# script -> (args naming output/nope, the message's start: flag and role)
SCRIPTS = {
    "chat.py": (["--path", "output/nope", "--prompt", "hi"], "--path (the chat model)"),
    "step3_rlhf/evaluate.py": (["--models", "sft=output/sft", "rlhf=output/nope", "--reward_model", "output/rm"],
                               "--models (the sft model)"),  # every path is checked, the first missing one named
    "step1_sft/prompt_eval.py": (["--model_name_or_path_baseline", "output/nope", "--model_name_or_path_finetune",
                                  "output/nope2"], "--model_name_or_path_baseline (the baseline model)"),
    "step2_reward/rw_eval.py": (["--model_name_or_path", "output/nope", "--prompt", "x", "--response", "y"],
                                "--model_name_or_path (the reward model)"),
}


def _run(script: str, args: list[str], cwd, env) -> tuple[subprocess.CompletedProcess, float]:
    start = time.monotonic()
    proc = subprocess.run([sys.executable, str(ROOT / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=300)
    return proc, time.monotonic() - start


@pytest.mark.parametrize("script", sorted(SCRIPTS))
def test_a_missing_local_folder_is_refused_at_once(script, engine_cache, tmp_path):
    (tmp_path / "output").mkdir()
    env = {k: v for k, v in offline_env(engine_cache).items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])  # run from elsewhere
    args, who = SCRIPTS[script]
    help_proc, help_s = _run(script, ["--help"], tmp_path, env)  # the same imports: the time a start costs now
    assert help_proc.returncode == 0, help_proc.stderr[-2000:]
    proc, seconds = _run(script, args, tmp_path, env)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    missing = "output/sft" if script.endswith("evaluate.py") else "output/nope"
    assert f"error: {who}: no such model folder {missing} (it does not exist here)" in proc.stderr, proc.stderr
    # The hub's retries took 49.5 s; a start (imports) is 3-10 s on a busy machine, so compare with --help's.
    assert seconds < help_s + 10, (seconds, help_s)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["output"] and not any((tmp_path / "output").iterdir())
