"""The README and docs/ stay true: the flag reference is the configs', and every path, module and link
they name exists."""
import importlib
import re
from pathlib import Path

import pytest

from engine.config import Step1Config, Step2Config, Step3Config
from engine.flags import flag_table

ROOT = Path(__file__).resolve().parents[2]
README = ROOT / "README.md"
FLAGS = ROOT / "docs" / "flags.md"
PAGES = [README, *sorted((ROOT / "docs").glob("*.md")), ROOT / "ds_configs" / "README.md"]
# Folders whose paths the pages name; a path with a placeholder (<step>, {a,b}, *, ...) is a pattern, not a file.
REPO_DIRS = ("engine/", "tests/", "step1_sft/", "step2_reward/", "step3_rlhf/", "benchmarks/", "ds_configs/",
             "docs/", ".ci/")
PLACEHOLDER = re.compile(r"[<>{}*$]|\.\.\.")
MODULE = re.compile(r"\bengine(?:\.\w+)+")
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("step, config", [("step1", Step1Config), ("step2", Step2Config), ("step3", Step3Config)])
def test_flag_reference_matches_config(step, config):
    text = FLAGS.read_text()
    start, end = f"<!-- flags:{step} -->\n", f"<!-- /flags:{step} -->"
    assert start in text and end in text
    assert text.split(start, 1)[1].split(end, 1)[0] == flag_table(config), "run: python docs/make_flags.py"


def test_quick_start_has_two_commands():
    block = README.read_text().split("## Quick start", 1)[1].split("```bash\n", 1)[1].split("```", 1)[0]
    assert [line for line in block.splitlines() if line.strip()] == [
        'pip install -e ".[dev]" && python e2e_rlhf.py',
        "python -m pytest -q"]


def test_readme_is_short():
    assert len(README.read_text().splitlines()) <= 250, "reference material belongs in docs/"


def repo_paths(text: str) -> set[str]:
    """The repository paths a page names (`engine/rl/ppo.py`, `tests/unit/test_x.py::test_y`, ...)."""
    paths = set()
    for token in re.split(r"[\s`()\[\]'\"|;]+", text):
        token = token.split("::", 1)[0].split("#", 1)[0].rstrip(".,:")
        if token.startswith(REPO_DIRS) and not PLACEHOLDER.search(token):
            paths.add(token)
    return paths


def resolves(dotted: str) -> bool:
    """`engine.a.b` is a module, or `engine.a.b.name` a module's attribute."""
    parts = dotted.split(".")
    for cut in range(len(parts), 0, -1):
        try:
            obj = importlib.import_module(".".join(parts[:cut]))
        except ModuleNotFoundError:
            continue
        for name in parts[cut:]:
            if not hasattr(obj, name):
                return False
            obj = getattr(obj, name)
        return True
    return False


def slug(heading: str) -> str:
    """GitHub's anchor of a Markdown heading."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page: Path) -> set[str]:
    return {slug(line.lstrip("#")) for line in page.read_text().splitlines() if line.startswith("#")}


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_named_paths_and_modules_exist(page):
    text = page.read_text()
    missing = sorted(p for p in repo_paths(text) if not (ROOT / p).exists())
    assert not missing, f"{page.name} names paths that do not exist: {missing}"
    unresolved = sorted({m for m in MODULE.findall(text) if not resolves(m)})
    assert not unresolved, f"{page.name} names modules that do not exist: {unresolved}"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_to_files(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        if not linked.is_file() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name} has broken links: {broken}"


def test_checks_catch_stale_names():
    """The checks above can fail: an old module path, a missing file and a bad anchor are caught."""
    assert resolves("engine.rl.ppo.score_position") and resolves("engine.planner")
    assert not resolves("engine.ppo_math") and not resolves("engine.rl.ppo.no_such_function")
    assert repo_paths("see `engine/ppo_math.py`, `tests/unit/test_x.py::test_y`, `step3_rlhf/run_<hw>.sh`.") == {
        "engine/ppo_math.py", "tests/unit/test_x.py"}
    assert "step-3-ppo-rlhf" in anchors(FLAGS) and slug("Step-3 benchmark: `x.py`") == "step-3-benchmark-xpy"
