"""`--help` a person can read (issue 17, item 8): the flags in titled sections, each flag listed once, the
defaults as they are (no `None` next to a text that names the real default), and examples that paste."""
from __future__ import annotations

import argparse
import ast
import dataclasses
import importlib.util
import re
import sys
from dataclasses import dataclass, field

import pytest

from engine.config import SECTIONS, DPOConfig, ModelArgs, Step1Config, Step2Config, Step3Config, arg
from engine.flags import flag_sections, leaf_fields
from engine.helptext import HelpFormatter, default_note, names_default, show_default
from tests.conftest import ROOT

COMMON = ["model", "data", "training", "DeepSpeed", "LoRA", "logging", "reliability"]
STEPS = {
    "step1_sft": (Step1Config, COMMON),
    "step2_reward": (Step2Config, [*COMMON, "reward model"]),
    "step2_dpo": (DPOConfig, [*COMMON, "DPO"]),
    "step3_rlhf": (Step3Config, [*COMMON, "roles", "generation", "RL algorithm", "evaluation"]),
}
SCRIPTS = ["step1_sft/main.py", "step2_reward/main.py", "step2_dpo/main.py", "step3_rlhf/main.py",
           "step3_rlhf/evaluate.py", "e2e_rlhf.py", "chat.py"]


@pytest.fixture(autouse=True)
def columns(monkeypatch):
    """argparse wraps to the terminal's width; fix it so that every run sees the same text."""
    monkeypatch.setenv("COLUMNS", "100")


@pytest.fixture
def script_help(monkeypatch, capsys):
    return lambda path: run_help(path, monkeypatch, capsys)


def run_help(path: str, monkeypatch, capsys) -> str:
    """What `python <path> --help` prints, run in this process (its parser is built before anything else)."""
    name = f"help_of_{path.replace('/', '_')[:-3]}"
    spec = importlib.util.spec_from_file_location(name, ROOT / path)
    module = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, name, module)  # dataclasses look their module up there
    spec.loader.exec_module(module)
    entry = getattr(module, "parse_args", None) or module.main  # the steps parse in main(), first thing
    with pytest.raises(SystemExit) as exit_:
        entry(["--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def options_listed(text: str) -> list[str]:
    """The option names at the head of each entry of a --help text (`  --x, --no-x`, `  --a, --b N`)."""
    heads = re.findall(r"^  (-[^ ].*?)(?:  |$)", text, re.MULTILINE)
    heads = [re.sub(r"\{[^}]*\}", "", head) for head in heads]  # choices are not options
    return [name for head in heads for name in re.findall(r"(?<![\w-])--?[\w-]+", head)]


@pytest.mark.parametrize("step", STEPS)
def test_step_help_is_grouped_by_section(step, script_help):
    config, titles = STEPS[step]
    text = script_help(f"{step}/main.py")
    found = re.findall(r"^(\S[^\n]*):\n", text, re.MULTILINE)
    assert set(titles) <= set(found), f"missing sections: {set(titles) - set(found)}"
    assert found[0] == "options" and found[1:] == list(flag_sections(config))
    # The usage line is short: the flags are listed once, below, not again in the usage.
    usage = text.split("\n\n", 1)[0]
    assert len(usage.splitlines()) == 1 and "--data_path" not in usage


@pytest.mark.parametrize("path", SCRIPTS)
def test_every_option_is_listed_once(path, script_help):
    listed = options_listed(script_help(path))
    assert len(listed) > 5
    assert sorted(n for n in set(listed) if listed.count(n) > 1) == []


@pytest.mark.parametrize("step", STEPS)
def test_step_help_lists_every_flag(step, script_help):
    listed = set(options_listed(script_help(f"{step}/main.py")))
    assert {f"--{name}" for name in leaf_fields(STEPS[step][0])} <= listed


@pytest.mark.parametrize("path", SCRIPTS)
def test_defaults_read_true(path, script_help):
    """No Python spelling of a default (None, False, [], ''), and never a default stated twice."""
    text = script_help(path)
    assert not re.search(r"default: (None|True|False|\[\]|''|unset)\)", text)
    entries = re.split(r"\n  -", text.split("\noptions:\n", 1)[1])
    twice = [e.split()[0] for e in entries if len(re.findall(r"\bdefault:", e, re.IGNORECASE)) > 1]
    assert twice == []


@pytest.mark.parametrize("config", [Step1Config, Step2Config, DPOConfig, Step3Config])
def test_every_field_shows_its_default(config):
    """A field whose default has no value to show (None, empty) says in its text what happens unset."""
    for name, (_, f, _) in leaf_fields(config).items():
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if default in (None, [], ""):
            assert names_default(f.metadata["help"]), f"--{name}: say 'Default: ...' in its help"


@pytest.mark.parametrize("config", [Step1Config, Step2Config, DPOConfig, Step3Config])
def test_sections_partition_the_flags(config):
    sections = flag_sections(config)
    flat = [name for names in sections.values() for name in names]
    assert sorted(flat) == sorted(leaf_fields(config)) and len(flat) == len(set(flat))
    assert list(sections) == [t for t in SECTIONS if t in sections]  # the order of SECTIONS


@dataclass
class OddPart:
    x: int = arg(1, "x", section="no such section")


@dataclass
class OddConfig:
    model: ModelArgs = field(default_factory=ModelArgs)
    log: OddPart = field(default_factory=OddPart)


def test_a_field_in_an_unknown_section_is_refused():
    with pytest.raises(TypeError, match="no such section"):
        flag_sections(OddConfig)


@pytest.mark.parametrize("value, shown", [
    (None, "unset"), (True, "on"), (False, "off"), ([], "none"), ([1, 2, 3], "1 2 3"), ("", "empty"),
    ("output/step1_sft", "output/step1_sft"), (9.65e-6, "9.65e-06"), (0, "0")])
def test_show_default(value, shown):
    assert show_default(value) == shown


def test_default_note_only_where_the_text_does_not_name_it():
    assert default_note("Peak learning rate.", 1e-3) == " (default: 0.001)"
    assert default_note("Model folder. Default: the built-in tiny model.", None) == ""
    assert default_note("Sampling temperature (step 3's default).", 1.0) == " (default: 1.0)"  # no colon: not named
    assert default_note("Extra flags.", "") == ""
    assert default_note("Dropout.", None) == ""


def test_formatter_one_placeholder_per_option_and_no_default_for_a_switch():
    p = argparse.ArgumentParser(prog="x", formatter_class=HelpFormatter)
    p.add_argument("--output-dir", "--output_dir", default="./output", help="Where everything goes.")
    p.add_argument("--actor-model", "--actor_model", choices=("tiny", "1.3b"), default="tiny", help="Actor.")
    p.add_argument("--ranks", type=int, default=2, help="Ranks. Default: two.")
    p.add_argument("--greedy", action="store_true", help="Decode greedily.")
    text = p.format_help()
    assert "--output-dir, --output_dir PATH" in text and "Where everything goes. (default: ./output)" in text
    assert "--actor-model, --actor_model {tiny,1.3b}" in text and text.count("{tiny,1.3b}") == 2  # usage + entry
    assert "--ranks N" in text and "Ranks. Default: two.\n" in text
    assert "Decode greedily.\n" in text


@pytest.mark.parametrize("path", [*SCRIPTS, "engine/planner/__main__.py"])
def test_examples_paste(path):
    """The description's commands: no `...` placeholders, every continued line ends with a backslash,
    and no line that only says to run --help."""
    doc = ast.get_docstring(ast.parse((ROOT / path).read_text()))
    assert "--help" not in doc and "[--" not in doc
    lines = doc.splitlines()
    for line, after in zip(lines, [*lines[1:], ""], strict=True):
        command = line.startswith("    ") and not line.lstrip().startswith(("#", "output/"))
        if command:
            assert not re.search(r"(^|\s)\.\.\.(\s|$)", line), line
        if command and after.startswith("        "):
            assert line.endswith("\\"), f"continued without a backslash: {line}"
