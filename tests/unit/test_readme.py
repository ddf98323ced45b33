"""The README's flag reference is the config's, so the two cannot drift."""
from pathlib import Path

import pytest

from engine.config import Step1Config, Step2Config, Step3Config
from engine.flags import flag_table

README = Path(__file__).resolve().parents[2] / "README.md"


@pytest.mark.parametrize("step, config", [("step1", Step1Config), ("step2", Step2Config), ("step3", Step3Config)])
def test_flag_reference_matches_config(step, config):
    text = README.read_text()
    start, end = f"<!-- flags:{step} -->\n", f"<!-- /flags:{step} -->"
    assert start in text and end in text
    assert text.split(start, 1)[1].split(end, 1)[0] == flag_table(config)


def test_quick_start_has_two_commands():
    block = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line for line in block.splitlines() if line.strip()] == [
        'pip install -e ".[dev]" && python e2e_rlhf.py',
        "python -m pytest -q"]
