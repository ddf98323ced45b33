"""What is installed here, for a bug report or to check an install: `python -m engine.doctor`.

Prints the versions of Python and of the packages the engine runs on, which build of torch this is (CPU,
CUDA x.y or ROCm x.y) and whether it sees a GPU, and where DeepSpeed's compiled ops are cached. Package
versions are read from their metadata, without importing them (DeepSpeed's import alone takes seconds);
torch is imported, since only it knows its build and its GPUs.
"""
from __future__ import annotations

import importlib.metadata
import os
import shutil
import sys
from pathlib import Path
from typing import Any

PACKAGES = ("torch", "deepspeed", "transformers", "peft", "datasets", "bitsandbytes", "accelerate")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


def version_of(package: str) -> str | None:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return None


def torch_build(torch: Any) -> str:
    """'CPU', 'CUDA 12.8' or 'ROCm 6.2': what the installed torch was built for."""
    if getattr(torch.version, "hip", None):
        return f"ROCm {torch.version.hip}"
    if torch.version.cuda:
        return f"CUDA {torch.version.cuda}"
    return "CPU"


def visible_gpus(torch: Any) -> list[str]:
    """The names of the GPUs this torch can use (none with a CPU build, or with a CUDA build and no driver)."""
    if not torch.cuda.is_available():
        return []
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]


def extension_cache(torch: Any) -> tuple[Path, str]:
    """(folder, where it comes from) of the ops DeepSpeed compiles: $TORCH_EXTENSIONS_DIR, else torch's
    default, <cache>/torch_extensions/py<version>_<cpu|cuXY|rocmXY> (torch.utils.cpp_extension's rule, spelled
    out here because its function creates the folder it names)."""
    if os.environ.get("TORCH_EXTENSIONS_DIR"):
        return Path(os.environ["TORCH_EXTENSIONS_DIR"]), "TORCH_EXTENSIONS_DIR"
    from torch.utils.cpp_extension import get_default_build_root

    hip, cuda = getattr(torch.version, "hip", None), torch.version.cuda
    build = f"rocm{hip.replace('.', '')}" if hip else f"cu{cuda.replace('.', '')}" if cuda else "cpu"
    python = f"py{sys.version_info.major}{sys.version_info.minor}{getattr(sys, 'abiflags', '')}"
    return Path(get_default_build_root()) / f"{python}_{build}", "torch's default"


def advice(build: str, gpus: list[str], driver: bool) -> str | None:
    """One line when the torch build does not fit the machine: a CUDA build without a GPU (GBs for nothing)
    or a CPU build on a machine with an NVIDIA driver (the GPU unused)."""
    if build.startswith("CUDA") and not gpus and not driver:
        return (f"this torch is a CUDA build but no GPU is visible; on a CPU-only machine the CPU build is a "
                f"fraction of the size: pip install torch=={version_of('torch') or '2.13.0'} --index-url {CPU_INDEX}")
    if build == "CPU" and driver:
        return ("an NVIDIA driver is installed (nvidia-smi) but this torch is the CPU build: install the CUDA "
                "build to train on the GPU (docs/install.md)")
    return None


def report() -> list[tuple[str, str]]:
    """(name, value) lines: Python, the packages, torch's build, the GPUs, the op cache."""
    lines = [("python", f"{sys.version.split()[0]} ({sys.executable})")]
    lines += [(name, version_of(name) or "not installed") for name in PACKAGES]
    if version_of("torch") is None:
        return lines
    import torch

    build, gpus = torch_build(torch), visible_gpus(torch)
    lines.append(("torch build", build))
    lines.append(("GPUs", ", ".join(gpus) if gpus else "none visible"))
    folder, source = extension_cache(torch)
    lines.append(("op cache", f"{folder} ({source})"))
    hint = advice(build, gpus, driver=shutil.which("nvidia-smi") is not None)
    if hint:
        lines.append(("note", hint))
    return lines


def main() -> None:
    lines = report()
    width = max(len(name) for name, _ in lines)
    for name, value in lines:
        print(f"{name:<{width}}  {value}")
    if version_of("torch") is None:
        sys.exit(f"torch is not installed; see docs/install.md (CPU-only machine: pip install torch==2.13.0 "
                 f"--index-url {CPU_INDEX})")


if __name__ == "__main__":
    main()
