"""Dependencies, with one rule pyproject.toml cannot express: keep the torch that is installed.

A torch already in the target environment (the CPU build from PyTorch's CPU index, or a CUDA build) is
kept as it is when it is 2.1 or newer: we ask for `torch>=2.1`, which any build label satisfies, so pip
never replaces it. With no torch installed we pin the release we test, torch==2.13.0, never an unpinned
torch that would move to a newer one; from PyPI that is the CUDA build (Linux), so CPU-only machines
install the CPU build first (docs/install.md).
"""
import os
import subprocess
import sys

from setuptools import setup


def installed_torch() -> str | None:
    # pip builds in an isolated environment that hides the target's site-packages; ask the target
    # interpreter itself, without the isolation's PYTHONPATH.
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE")}
    probe = "import importlib.metadata as m; print(m.version('torch'))"
    try:
        result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout.strip() or None if result.returncode == 0 else None


torch_req = "torch>=2.1" if installed_torch() else "torch==2.13.0"

setup(
    install_requires=[
        torch_req,
        # Upper bounds where the next release may break us; requirements/ci-constraints.txt is the set tested.
        "deepspeed>=0.15,<0.20",  # engine/runtime touches DeepSpeed's private API, verified on 0.19
        "transformers>=4.46,<6",
        "datasets>=2.19",
        "peft>=0.12,<1",
        "bitsandbytes>=0.43,<1",
        "safetensors>=0.4",
        "tokenizers>=0.19",
        "tensorboard>=2.14",
        "matplotlib>=3.7",
        "tqdm>=4.66",
        "pyyaml>=6",
        "psutil>=5.9",
        "pyarrow>=14",
    ],
    extras_require={
        "dev": ["pytest>=8", "pytest-xdist>=3.5", "ruff>=0.17"],
        "flash": ["flash-attn>=2.5"],
        "wandb": ["wandb"],
        # benchmarks/trl_grpo_compare.py only (its TRL_REQUIREMENT); tested with trl 1.16.0 on transformers 5.25
        "trl": ["trl>=1.16.0,<1.17"],
    },
)
