"""A clean run's console: steps 1, 2 and 3 on the built-in tiny model show no warning outside the
allow-list of tests/helpers/console_warnings.py (the probe counts Python warnings and WARNING log records
of every logger), say in one line whether the value head is new or loaded, and the count can fail."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT
from tests.helpers.console_warnings import Allowed, probe_env, read_warnings, unexpected

pytestmark = pytest.mark.smoke

TINY3 = ["--max_prompt_seq_len", "32", "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "16",
         "--per_device_training_batch_size", "16", "--dtype", "fp32", "--test_stop_step", "1", "--eval_prompts", "16"]


def pythonpath() -> str:
    return os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)


def probed_step(run_step, folder: Path, script: str, args: list[str]) -> tuple[list[dict[str, str]], str]:
    """(warnings shown, console output) of one step's main in one process, under the probe."""
    folder.mkdir()
    proc = run_step(script, args, env=probe_env(folder, pythonpath()))
    return read_warnings(folder), proc.stdout + proc.stderr


def test_probe_counts_a_deliberate_warning_of_each_kind(tmp_path):
    """The self-test: a Python warning and a third-party WARNING record, added on purpose, are both counted
    and reported as new; an allow-list entry for each clears them; an INFO record is no warning."""
    code = ("import logging, warnings; warnings.warn('deliberate'); "
            "logging.getLogger('somelib').warning('deliberate %s', 'too'); logging.getLogger('somelib').info('no')")
    subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **probe_env(tmp_path, pythonpath())),
                   check=True, capture_output=True)
    found = read_warnings(tmp_path)
    assert [(w["kind"], w["message"]) for w in unexpected(found)] == [("warning", "deliberate"),
                                                                      ("log", "deliberate too")]
    allow = (Allowed(r"^UserWarning ", r"^deliberate$", "test"), Allowed(r"^WARNING somelib$", r"too$", "test"))
    assert unexpected(found, allow) == []


def test_clean_steps_warn_only_as_allowed(run_step, tmp_path):
    sft, rm, rlhf = tmp_path / "sft", tmp_path / "rm", tmp_path / "rlhf"
    found1, _ = probed_step(run_step, tmp_path / "probe1", "step1_sft/main.py",
                            ["--output_dir", str(sft), "--max_seq_len", "64", "--test_stop_step", "2"])
    found2, console2 = probed_step(run_step, tmp_path / "probe2", "step2_reward/main.py",
                                   ["--model_name_or_path", str(sft), "--output_dir", str(rm), "--max_seq_len", "64",
                                    "--per_device_train_batch_size", "8", "--test_stop_step", "2"])
    found3, console3 = probed_step(run_step, tmp_path / "probe3", "step3_rlhf/main.py",
                                   ["--actor_model_name_or_path", str(sft), "--critic_model_name_or_path", str(rm),
                                    "--output_dir", str(rlhf), *TINY3])
    assert {"step 1": unexpected(found1), "step 2": unexpected(found2), "step 3": unexpected(found3)} == {
        "step 1": [], "step 2": [], "step 3": []}
    # transformers' load report of the new value head is replaced by one line; step 3 loads it, twice.
    assert "LOAD REPORT" not in console2 and console2.count("value head (score) new, randomly initialised") == 1
    assert console3.count("critic: value head (score) loaded from") == 1
    assert console3.count("reward: value head (score) loaded from") == 1


@pytest.mark.parametrize("quantized", [False, True])
def test_bitsandbytes_is_imported_only_for_a_quantized_role(quantized):
    """peft imports bitsandbytes whenever it can, and transformers' schedules import peft: a run that
    quantizes nothing must not load it (its import logs a warning per rank and may ask the hub for a kernel)."""
    code = ("import sys; from engine.models.load import keep_bitsandbytes_out; "
            f"keep_bitsandbytes_out(quantized={quantized}); import peft; from transformers import get_scheduler; "
            "print(sys.modules.get('bitsandbytes') is not None)")
    proc = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, PYTHONPATH=pythonpath(),
                                                                   HF_HUB_OFFLINE="1"),
                          capture_output=True, text=True, check=True, timeout=300)
    assert proc.stdout.strip().splitlines()[-1] == str(quantized)
