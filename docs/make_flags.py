"""Regenerate the flag tables of docs/flags.md from the step configs: `python docs/make_flags.py`.

Each table sits between `<!-- flags:stepN -->` and `<!-- /flags:stepN -->`; the text around them is
written by hand. tests/unit/test_readme.py fails when a table differs from the configs.
"""
from __future__ import annotations

from pathlib import Path

from engine.config import DPOConfig, Step1Config, Step2Config, Step3Config
from engine.flags import flag_table

FLAGS_MD = Path(__file__).resolve().parent / "flags.md"
CONFIGS = {"step1": Step1Config, "step2": Step2Config, "step2_dpo": DPOConfig, "step3": Step3Config}


def regenerate(text: str) -> str:
    """`text` with every step's table replaced by the one its config generates."""
    for step, config in CONFIGS.items():
        start, end = f"<!-- flags:{step} -->\n", f"<!-- /flags:{step} -->"
        head, rest = text.split(start, 1)
        text = head + start + flag_table(config) + end + rest.split(end, 1)[1]
    return text


if __name__ == "__main__":
    FLAGS_MD.write_text(regenerate(FLAGS_MD.read_text()))
    print(f"wrote {FLAGS_MD}")
