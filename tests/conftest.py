"""Shared fixtures: an isolated cache for the built-in model, and a runner for the step scripts."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """One cache folder for the built-in tiny model for the whole test session."""
    return tmp_path_factory.mktemp("engine_cache")


@pytest.fixture(scope="session")
def run_step(engine_cache):
    """run_step(script, args, nprocs=1) -> CompletedProcess; nprocs > 1 uses `launcher` (deepspeed or torchrun)."""

    def run(script: str, args: list[str], nprocs: int = 1, timeout: int = 600, check: bool = True,
            launcher: str = "deepspeed"):
        env = dict(os.environ, RLHF_ENGINE_CACHE=str(engine_cache), HF_HUB_OFFLINE="1",
                   HF_DATASETS_OFFLINE="1", TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")
        if nprocs == 1:
            cmd = [sys.executable, str(ROOT / script)]
        elif launcher == "deepspeed":
            port = str(29500 + os.getpid() % 1000)
            cmd = ["deepspeed", "--num_gpus", str(nprocs), "--master_port", port, str(ROOT / script)]
        else:
            port = str(28500 + os.getpid() % 1000)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                   "--master_port", port, str(ROOT / script)]
        proc = subprocess.run(cmd + ["--disable_tqdm", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
        return proc

    return run


def read_metrics(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines() if line.strip()]


def eval_rows(folder: Path) -> list[dict]:
    return [r for r in read_metrics(folder) if "eval/perplexity" in r]


def train_losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["train/loss"] for r in read_metrics(folder) if "train/loss" in r}


def tiny_model_folder(engine_cache: Path, seed: int = 1234) -> Path:
    """The built-in model folder for `seed` inside the test cache, made if missing (default --seed: 1234)."""
    from engine import embedded

    old = os.environ.get("RLHF_ENGINE_CACHE")
    os.environ["RLHF_ENGINE_CACHE"] = str(engine_cache)
    try:
        return embedded.ensure_tiny_model(seed)
    finally:
        if old is None:
            del os.environ["RLHF_ENGINE_CACHE"]
        else:
            os.environ["RLHF_ENGINE_CACHE"] = old


@pytest.fixture(scope="session")
def rlhf_inputs(run_step, tmp_path_factory) -> tuple[Path, Path]:
    """(step-1 SFT folder, step-2 reward-model folder) on the bundled task, made once per session.

    The SFT model is trained long enough to sort some lists (rule success about 0.2 when sampling), so step 3 has
    something to improve on and a reward model that tells right from wrong."""
    root = tmp_path_factory.mktemp("rlhf_inputs")
    sft, rm = root / "step1", root / "step2"
    run_step("step1_sft/main.py", ["--output_dir", str(sft), "--num_train_epochs", "2", "--learning_rate", "3e-3"])
    run_step("step2_reward/main.py", ["--model_name_or_path", str(sft), "--output_dir", str(rm),
                                      "--learning_rate", "1e-3", "--num_train_epochs", STEP2_EPOCHS])
    return sft, rm


STEP2_EPOCHS = "4"
