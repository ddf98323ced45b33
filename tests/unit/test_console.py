"""The console of a run: the DeepSpeed launcher's lines kept off it, log lines through the progress bar's
writer, and transformers' load report of a reward model held back only when it says what is expected."""
from __future__ import annotations

import io
import logging
import random

import pytest
from tqdm import tqdm

import e2e_rlhf as e2e
from engine.models.reward_model import LOAD_REPORT_LOGGER, expected_load_report, held_load_report
from engine.runtime.distributed import TqdmLogHandler, verbose_wanted

# Lines as the DeepSpeed launcher (0.19) and a rank print them; the third follows a progress bar's last
# update without a newline, as it does in the demo's console.
STAMP = "[2026-12-07 03:42:45,857]"
HOSTFILE = f"{STAMP} [WARNING] [runner.py:214:fetch_hostfile] Unable to find hostfile, will proceed\n"
CMD = f"{STAMP} [INFO] [runner.py:618:main] cmd = python -u -m deepspeed.launcher.launch " + "x" * 600 + "\n"
SPAWNED = f"{STAMP} [INFO] [launch.py:245:main] process 25553 spawned with command: ['python', '-u']\n"
FAILED = f"{STAMP} [ERROR] [launch.py:259:sigkill_handler] ['python', '-u'] exits with return code = 1\n"
BAR = "step 1 SFT: 100%|##########| 100/100 [00:03<00:00, 25.89it/s, loss=0.3927]"
EXITED = f"{STAMP} [INFO] [launch.py:285:main] Process 25553 exits successfully.\n"
OUTPUT = (HOSTFILE + CMD + SPAWNED + "03:43:05 INFO train data: 800 rows, 800 kept\n" + BAR + "\r" + BAR + EXITED
          + FAILED + "=== done\n")


def through(lines: e2e.LauncherLines, data: bytes, seed: int) -> bytes:
    """`data` fed in random pieces (as reads of a pipe return it), then flushed."""
    rng, out, i = random.Random(seed), b"", 0
    while i < len(data):
        n = rng.randint(1, 90)
        out, i = out + lines.feed(data[i:i + n]), i + n
    return out + lines.flush()


@pytest.mark.parametrize("seed", range(20))
def test_launcher_info_lines_leave_the_console_and_errors_stay(seed):
    shown = through(e2e.LauncherLines(verbose=False, hide_hostfile=True), OUTPUT.encode(), seed).decode()
    assert shown == ("03:43:05 INFO train data: 800 rows, 800 kept\n" + BAR + "\r" + BAR + FAILED + "=== done\n")


def test_launcher_lines_stay_with_verbose_and_the_hostfile_warning_on_several_machines():
    assert through(e2e.LauncherLines(verbose=True, hide_hostfile=True), OUTPUT.encode(), 0) == OUTPUT.encode()
    shown = through(e2e.LauncherLines(verbose=False, hide_hostfile=False), OUTPUT.encode(), 0).decode()
    assert shown.startswith(HOSTFILE) and "[INFO]" not in shown


def test_an_unfinished_progress_bar_passes_at_once():
    lines = e2e.LauncherLines(verbose=False, hide_hostfile=True)
    assert lines.feed(b"step 3 PPO:   1%|          | 1/125 [00:01<03:42,  1.80s/it]") == (
        b"step 3 PPO:   1%|          | 1/125 [00:01<03:42,  1.80s/it]")
    assert lines.feed(b"\rstep 3 PPO: [2026-12-07 03:4") == b"\rstep 3 PPO: "  # may be a launcher line: held
    assert lines.feed(b"4:45,857] [INFO] [launch.py:285:main] Process 1 exits successfully.\n") == b""
    assert lines.flush() == b""


def log_beside_a_bar(handler_class: type[logging.StreamHandler]) -> str:
    stream = io.StringIO()
    log = logging.getLogger("test_console.bar")
    log.propagate, log.handlers = False, [handler_class(stream)]
    try:
        with tqdm(total=10, file=stream, desc="step 1 SFT") as bar:
            bar.update(3)
            log.warning("a log line")
            bar.update(3)
    finally:
        log.handlers = []
    return stream.getvalue()


def test_log_lines_do_not_glue_to_the_progress_bar():
    def line_of(text: str) -> str:  # what a terminal shows on the line the message lands on
        return text[:text.index("a log line")].replace("\r", "\n").rsplit("\n", 1)[-1]

    # A plain handler writes after the bar's text; ours clears the bar first and redraws it after.
    assert "step 1 SFT" in line_of(log_beside_a_bar(logging.StreamHandler))
    ours = log_beside_a_bar(TqdmLogHandler)
    assert line_of(ours).strip() == "" and ours.count("a log line\n") == 1
    assert "6/10" in ours.split("a log line\n", 1)[1]


def test_verbose_from_the_flag_or_the_environment(monkeypatch):
    monkeypatch.delenv("RLHF_ENGINE_VERBOSE", raising=False)
    assert verbose_wanted(True) and not verbose_wanted(False)
    for value, wanted in (("1", True), ("yes", True), ("0", False), ("", False)):
        monkeypatch.setenv("RLHF_ENGINE_VERBOSE", value)
        assert verbose_wanted(False) == wanted, value


@pytest.mark.parametrize("info, new_head, expected", [
    ({"missing_keys": [], "unexpected_keys": []}, False, True),                          # a reward-model folder
    ({"missing_keys": ["score.weight"], "unexpected_keys": ["lm_head.weight"]}, True, True),  # a causal-LM folder
    ({"missing_keys": ["score.weight", "model.norm.weight"], "unexpected_keys": []}, True, False),
    ({"missing_keys": [], "unexpected_keys": ["lm_head.weight"]}, False, False),         # an LM head, no new head
    ({"missing_keys": ["score.weight"], "unexpected_keys": [], "mismatched_keys": [("score.weight", 1, 2)]},
     True, False),
])
def test_only_the_expected_load_report_is_held_back(info, new_head, expected):
    assert expected_load_report(info, new_head) == expected


def test_held_load_report_holds_only_the_report():
    seen: list[str] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    report_logger, keep = logging.getLogger(LOAD_REPORT_LOGGER), Keep()
    report_logger.addHandler(keep)
    try:
        with held_load_report() as held:
            report_logger.warning("LlamaForSequenceClassification LOAD REPORT from: x\nscore.weight | MISSING")
            report_logger.warning("another warning")
        report_logger.warning("LlamaForSequenceClassification LOAD REPORT from: y")
    finally:
        report_logger.removeHandler(keep)
    assert [r.getMessage().split("\n")[0] for r in held] == ["LlamaForSequenceClassification LOAD REPORT from: x"]
    assert seen == ["another warning", "LlamaForSequenceClassification LOAD REPORT from: y"]
