"""The tested dependency set: requirements/ci-constraints.txt pins exactly one version of every package
setup.py asks for, each inside setup.py's bounds; the packages whose next major release may break us have
an upper bound; .ci/run installs with the file."""
from __future__ import annotations

import ast

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from tests.conftest import ROOT

CONSTRAINTS = ROOT / "requirements" / "ci-constraints.txt"
UPPER_BOUNDED = ("deepspeed", "transformers", "peft", "bitsandbytes")


def setup_requirements() -> tuple[list[Requirement], str]:
    """(setup.py's literal requirements, install_requires and the dev extra; its torch pin for an
    environment without torch), read from its syntax tree: importing setup.py would run setup()."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    call = next(n for n in ast.walk(tree) if isinstance(n, ast.Call) and getattr(n.func, "id", "") == "setup")
    keywords = {k.arg: k.value for k in call.keywords}
    lines = [ast.literal_eval(e) for e in keywords["install_requires"].elts if isinstance(e, ast.Constant)]
    lines += ast.literal_eval(keywords["extras_require"])["dev"]
    torch_pin = next(n.value.orelse.value for n in tree.body
                     if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "torch_req")
    return [Requirement(line) for line in lines], torch_pin


def constraint_pins() -> dict[str, Version]:
    pins: dict[str, Version] = {}
    for line in CONSTRAINTS.read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            req = Requirement(line)
            (spec,) = req.specifier  # exactly one `==` each: a lock, not a range
            assert spec.operator == "==" and canonicalize_name(req.name) not in pins, line
            pins[canonicalize_name(req.name)] = Version(spec.version)
    return pins


def test_every_requirement_is_pinned_inside_setup_py_bounds():
    requirements, _ = setup_requirements()
    pins = constraint_pins()
    assert len(requirements) > 10
    for req in requirements:
        name = canonicalize_name(req.name)
        assert name in pins, f"{req.name} is not pinned in {CONSTRAINTS.name}"
        assert req.specifier.contains(pins[name], prereleases=True), f"{req.name}=={pins[name]} breaks {req}"


@pytest.mark.parametrize("name", UPPER_BOUNDED)
def test_packages_whose_next_release_may_break_us_have_an_upper_bound(name):
    requirements, _ = setup_requirements()
    (req,) = [r for r in requirements if canonicalize_name(r.name) == name]
    assert any(spec.operator in ("<", "<=", "==", "~=") for spec in req.specifier), req


def test_torch_is_pinned_by_release_so_any_build_of_it_satisfies_the_pin():
    _, torch_pin = setup_requirements()
    pin = constraint_pins()["torch"]
    assert pin.local is None  # `==2.13.0+cpu` would refuse a CUDA build of the same release
    assert Requirement(f"torch=={pin}").specifier.contains("2.13.0+cu128")
    assert Requirement(torch_pin).specifier.contains(pin), (torch_pin, pin)  # setup.py's pin without torch


def test_ci_installs_the_constraints():
    assert "-c requirements/ci-constraints.txt" in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("installed", ["2.13.0+cpu", "2.1.0+cpu", "2.13.0+cu128", "2.13.0"])
def test_an_installed_torch_is_kept(installed):
    """With torch installed, setup.py asks for a range that its build satisfies, so pip does not replace a
    CPU build from PyTorch's CPU index with PyPI's CUDA one."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    with_torch = next(n.value.body.value for n in tree.body
                      if isinstance(n, ast.Assign) and getattr(n.targets[0], "id", "") == "torch_req")
    assert Requirement(with_torch).specifier.contains(installed), with_torch


def test_ci_installs_the_cpu_torch_on_a_machine_without_one():
    """PyPI's torch==2.13.0 is the CUDA build with 19 NVIDIA packages; a CPU-only CI machine without torch
    takes the CPU build from PyTorch's CPU index before the project's install."""
    run = (ROOT / ".ci" / "run").read_text().replace("\\\n", " ")
    run = " ".join(run.split())
    cpu = ("pip install --quiet --disable-pip-version-check --retries 0 --timeout 20 torch==2.13.0 --index-url "
           "https://download.pytorch.org/whl/cpu")
    assert cpu in run and run.index(cpu) < run.index("-c requirements/ci-constraints.txt")
    assert f"torch=={constraint_pins()['torch']} " in cpu  # the release CI tests
