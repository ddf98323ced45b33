"""Bad input to step 1: a one-line message naming the problem and the fix, exit 2, no traceback,
nothing written to --output_dir."""
from __future__ import annotations

import pytest

pytestmark = pytest.mark.smoke


def _bad_jsonl(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"prompt": " Human: hi Assistant:", "chosen": " yo"}\n{"prompt": oops}\n')
    return ["--data_path", str(path)], f"{path}:2: malformed JSON"


def _empty_field(tmp_path):
    path = tmp_path / "empty.jsonl"
    path.write_text('{"prompt": " Human: hi Assistant:", "chosen": "   "}\n')
    return ["--data_path", str(path)], "field 'chosen' is empty"


CASES = {
    "missing data file": lambda t: (["--data_path", str(t / "nope.jsonl")], "not a file, folder or known dataset"),
    "malformed json line": _bad_jsonl,
    "empty field": _empty_field,
    "missing model folder": lambda t: (["--model_name_or_path", str(t / "no-model")], "no such model folder"),
    "offload below zero 2": lambda t: (["--offload", "--zero_stage", "1"], "--offload needs --zero_stage 2 or 3"),
    "negative lora_dim": lambda t: (["--lora_dim", "-2"], "--lora_dim must be >= 0"),
    "unknown flag": lambda t: (["--not_a_flag", "1"], "unknown flag"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_user_error_is_clean(case, run_step, tmp_path):
    args, message = CASES[case](tmp_path)
    out = tmp_path / "out"
    proc = run_step("step1_sft/main.py", ["--output_dir", str(out), *args], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not out.exists() or not any(out.iterdir())


def test_output_dir_that_is_a_file(run_step, tmp_path):
    target = tmp_path / "a_file"
    target.write_text("x")
    proc = run_step("step1_sft/main.py", ["--output_dir", str(target)], check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr and "Traceback" not in proc.stderr
    assert target.read_text() == "x"
