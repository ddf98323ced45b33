"""Bad input to the three steps, end to end: a one-line `error: ...` naming the problem and the fix, exit
status 2, no traceback, and nothing written (docs/errors.md lists every case).

The cases (tests/helpers/bad_input_cases.py) run inside one Python process, each through
`engine.runtime.entry.run_main` as `python stepN/main.py` runs it; a few also run as real subprocesses, for
the true exit status and stderr.
"""
from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.conftest import ROOT, offline_env
from tests.helpers.bad_input_cases import CASES, GOOD, case_ids, cases_by_id, errors_table, jsonl

# One xdist worker runs the whole module, so the cases run once (a module fixture runs once per worker).
pytestmark = [pytest.mark.smoke, pytest.mark.xdist_group("bad_input")]

MAX_MESSAGE_CHARS = 400


@pytest.fixture(scope="module")
def bad_input_run(engine_cache, tmp_path_factory) -> dict:
    """{case id: result} of one run of every case."""
    work = tmp_path_factory.mktemp("bad_input")
    cmd = [sys.executable, "-m", "tests.helpers.bad_input_cases", str(work), str(work / "results.json")]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(engine_cache), capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"the bad-input runner failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads((work / "results.json").read_text())


@pytest.mark.parametrize("case_id", case_ids())
def test_user_error_is_refused_cleanly(case_id, bad_input_run):
    case, step = cases_by_id()[case_id]
    result = bad_input_run[case_id]
    if "skipped" in result:
        pytest.skip(result["skipped"])
    assert not result["traceback"], result["stderr"]
    assert result["exit"] == 2, result["stderr"]
    message = result["message"]
    assert case.message in message and case.fix in message and case.names in message, message
    # One line; a configuration error is the line "invalid configuration:" and one "  - " line per problem.
    lines = message.split("\n")
    assert len(lines) == 1 or (lines[0] == "invalid configuration:" and len(lines) == 2 and lines[1].startswith("  - "))
    assert len(message) < MAX_MESSAGE_CHARS, message
    left = result["changed"]
    if case.leaves == "data_cache":  # found after tokenizing: at most the complete cache, reused by the next run
        left = [p for p in left if p not in ("out", "out/data_cache")
                and not re.fullmatch(r"out/data_cache/\w+\.safetensors", p)]
        assert result["broken_caches"] == []
    assert left == [], f"the refused run created, changed or removed {left}"


# The model-path cases are refused before any model is loaded or the hub is asked (online, a hub-shaped missing
# path once retried the hub for 49.5 s). The runner calls the mains in one process: the time is the checks', not
# the imports'.
MODEL_PATH_CASES = ("missing-model-folder", "missing-actor-folder", "missing-critic-folder",
                    "hub-shaped-missing-folder", "hub-shaped-missing-actor-folder", "uncached-hub-model-offline")


@pytest.mark.parametrize("case_id", [i for i in case_ids() if cases_by_id()[i][0].name in MODEL_PATH_CASES])
def test_a_bad_model_path_is_refused_in_seconds(case_id, bad_input_run):
    result = bad_input_run[case_id]
    assert result["exit"] == 2 and result["seconds"] < 15, result


def test_read_only_output_dir_is_refused_where_the_os_says_so(monkeypatch, tmp_path):
    # The output-dir-read-only case is skipped as root (root writes anywhere); this checks the same path.
    import os

    from engine.errors import UserError
    from engine.runtime.run import check_output_dir

    monkeypatch.setattr(os, "access", lambda path, mode: False)
    with pytest.raises(UserError, match="no permission to write in .*; choose a folder you can write to"):
        check_output_dir(str(tmp_path / "out"))


def test_every_case_is_in_the_docs_table_and_back():
    text = (ROOT / "docs" / "errors.md").read_text()
    assert errors_table() in text, \
        "docs/errors.md is out of date: paste tests.helpers.bad_input_cases.errors_table() in"
    documented = re.findall(r"^\|.*\| `([\w-]+)`(?: \(\*\))? \|$", text, flags=re.M)
    assert sorted(documented) == sorted(case.name for case in CASES)
    assert len(set(case_ids())) == len(case_ids())


# ----------------------------------------------------------------------------------------------
# A case per step as a real process: the exit status and stderr a shell sees (step 1's after the process
# group is up and the data read; the others fail sooner, which keeps these tests cheap)
# ----------------------------------------------------------------------------------------------
def _assert_refused(proc, out, message):
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert "\nerror: " in "\n" + proc.stderr and message in proc.stderr, proc.stderr[-2000:]
    assert not out.exists()


def test_step1_malformed_jsonl_as_a_process(run_step, tmp_path):
    data = tmp_path / "bad.jsonl"
    data.write_text(jsonl(GOOD[:1]) + '{"prompt": oops}\n')
    out = tmp_path / "out"
    proc = run_step("step1_sft/main.py", ["--output_dir", str(out), "--data_path", str(data)], check=False)
    _assert_refused(proc, out, f"{data}:2: malformed JSON")


def test_step2_output_dir_that_is_a_file_as_a_process(run_step, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = run_step("step2_reward/main.py", ["--output_dir", str(target)], check=False)
    _assert_refused(proc, tmp_path / "out", "is a file; give a folder path")
    assert target.read_text() == "x"


def test_step3_batch_mismatch_as_a_process(run_step, tmp_path):
    out = tmp_path / "out"
    proc = run_step("step3_rlhf/main.py", ["--output_dir", str(out), "--per_device_generation_batch_size", "3",
                                           "--per_device_training_batch_size", "2"], check=False)
    _assert_refused(proc, out, "must be a multiple of --per_device_training_batch_size 2")
