"""chat.py: one-shot and interactive answers from a saved actor folder; a wrong path is a clean error."""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, offline_env, tiny_model_folder

pytestmark = pytest.mark.smoke


def _chat(engine_cache, *args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(ROOT / "chat.py"), *args], input=stdin, capture_output=True,
                          text=True, timeout=300, env=offline_env(engine_cache))


def test_one_shot_and_interactive_chat(engine_cache):
    folder = str(tiny_model_folder(engine_cache))
    proc = _chat(engine_cache, "--path", folder, "--prompt", "sort 3 1 2", "--max_new_tokens", "8")
    assert proc.returncode == 0, proc.stderr[-2000:]
    proc = _chat(engine_cache, "--path", folder, "--max_new_tokens", "4", "--do_sample",
                 stdin="sort 5 4\nclear\nsort 2 1\nquit\n")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("Assistant:") == 2  # one answer per message; 'clear' and 'quit' are commands


def test_render_keeps_the_conversation():
    from chat import render

    class NoTemplate:
        chat_template = None

    prompt = render([("sort 2 1", "1 2")], "sort 9 8", NoTemplate())
    assert prompt == " Human: sort 2 1 Assistant: 1 2 Human: sort 9 8 Assistant:"


def test_wrong_path_is_a_clean_error(engine_cache, tmp_path):
    proc = _chat(engine_cache, "--path", str(tmp_path / "nope"), "--prompt", "hi")
    assert proc.returncode == 2 and "no such model folder" in proc.stderr and "Traceback" not in proc.stderr
