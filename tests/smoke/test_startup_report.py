"""Every step reports its start-up (engine/observe/startup.py): from the process's start to the first finished
step, with the fixed costs in it, as a log line and as `startup/` metrics of the first step."""
from __future__ import annotations

import time

import pytest

from tests.conftest import read_metrics
from tests.helpers.startup_checks import check_startup
from tests.smoke.test_step3_rlhf import TINY

pytestmark = pytest.mark.smoke


def timed(run_step, script: str, args: list[str]):
    start = time.time()
    proc = run_step(script, [*args, "--test_stop_step", "2"])
    return proc, time.time() - start


@pytest.mark.parametrize("script", ["step1_sft/main.py", "step2_reward/main.py"])
def test_steps_1_and_2_report_their_start_up(run_step, tmp_path, script):
    out = tmp_path / "out"
    proc, wall = timed(run_step, script, ["--output_dir", str(out), "--per_device_train_batch_size", "8",
                                          "--max_seq_len", "64"])
    check_startup(read_metrics(out), proc.stderr, wall, "perf/step_time_s")


def test_step3_reports_its_start_up(run_step, tiny_roles, tmp_path):
    actor, critic = tiny_roles
    out = tmp_path / "out"
    proc, wall = timed(run_step, "step3_rlhf/main.py", ["--actor_model_name_or_path", str(actor),
                                                        "--critic_model_name_or_path", str(critic),
                                                        "--output_dir", str(out), *TINY, "--eval_prompts", "16"])
    check_startup(read_metrics(out), proc.stderr, wall, "perf/e2e_s")
