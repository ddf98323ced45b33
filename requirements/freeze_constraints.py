"""Write requirements/ci-constraints.txt: the exact versions installed here of rlhf-engine[dev] and of
everything it pulls in, for `pip install -c requirements/ci-constraints.txt -e ".[dev]"` (docs/install.md).

Run it in the environment the tests just passed in: `python requirements/freeze_constraints.py`.
"""
from __future__ import annotations

import importlib.metadata as metadata
import sys
from pathlib import Path

from packaging.markers import default_environment
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

ROOT_PACKAGE, EXTRAS = "rlhf-engine", ("dev",)
ALSO = ("ruff",)  # the linter .ci/run runs; pinned when installed
OUT = Path(__file__).with_name("ci-constraints.txt")
HEADER = """\
# The exact set `.ci/run` installs and tests: `pip install -c requirements/ci-constraints.txt -e ".[dev]"`.
# Made by `python requirements/freeze_constraints.py` on {platform}, Python {python}; see docs/install.md.
# torch is pinned by release only (`==X.Y.Z`, no `+cpu`/`+cuNNN` label): PEP 440 ignores the build label
# when a pin has none, so a CPU build and a CUDA build of that release both satisfy it, and pip keeps the
# build already installed; install your accelerator's build of that release first.
"""


def _wanted(requirement: Requirement, extras: tuple[str, ...]) -> bool:
    if requirement.marker is None:
        return True
    return any(requirement.marker.evaluate(default_environment() | {"extra": e}) for e in ("", *extras))


def closure(root: str = ROOT_PACKAGE, extras: tuple[str, ...] = EXTRAS) -> dict[str, str]:
    """{distribution name: installed version} of `root[extras]` and all it requires, transitively."""
    found: dict[str, str] = {}
    todo = [(root, extras)]
    while todo:
        name, want_extras = todo.pop()
        key = canonicalize_name(name)
        if key in found:
            continue
        dist = metadata.distribution(name)
        found[key] = dist.version
        for line in dist.requires or []:
            requirement = Requirement(line)
            if _wanted(requirement, want_extras):
                todo.append((requirement.name, tuple(requirement.extras)))
    del found[canonicalize_name(root)]
    return found


def pin(version: str) -> str:
    """The release without a local build label (2.13.0+cpu -> 2.13.0)."""
    return Version(version).public


def main() -> None:
    pins = closure()
    for name in ALSO:
        try:
            pins.setdefault(canonicalize_name(name), metadata.version(name))
        except metadata.PackageNotFoundError:
            pass
    python = ".".join(map(str, sys.version_info[:3]))
    lines = [f"{name}=={pin(version)}" for name, version in sorted(pins.items())]
    OUT.write_text(HEADER.format(platform=sys.platform, python=python) + "\n".join(lines) + "\n")
    print(f"wrote {len(lines)} pins to {OUT}")


if __name__ == "__main__":
    main()
