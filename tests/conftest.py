"""Shared fixtures: an isolated cache for the built-in model, the step-3 roles made from it, a runner for
the step scripts, and the pipeline run.

Tiers (markers in pyproject.toml):
- unit (tests/unit/, no marker): pure functions, configs, scripts; well under a second each.
- smoke (tests/smoke/): each step's main on the built-in tiny model for a few steps; seconds each.
- e2e: the tests that read the pipeline run (`e2e_demo`: `python e2e_rlhf.py`, two ranks, about 4-5 minutes
  on 2 cores); marked here, by the fixture they use, and kept on one xdist worker, which builds it once.
- distributed (tests/distributed/): 2 CPU ranks under the deepspeed launcher; about a minute each.
- gpu (tests/gpu/): needs CUDA; skipped without it.
- multihost (tests/multihost/): two or three hosts made of network namespaces (tests/helpers/netns.py), as
  root; skipped, saying why, without root, `ip` or namespace support. `python -m pytest -q -m multihost`.

`python -m pytest -q` runs unit and smoke (addopts: `-m "not e2e and not distributed and not multihost"`);
`python -m pytest -q -m "e2e or distributed"` two others, `-m multihost` the last; `-m ""` every tier;
`.ci/run` runs the three commands. A later `-m` replaces the default one, so a file of a left-out tier needs it:
`python -m pytest -q -m distributed tests/distributed/test_step1_two_ranks.py`.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# DeepSpeed's op cache (engine/runtime/op_builds.py) is per environment, under the engine's cache root; the
# tests point RLHF_ENGINE_CACHE at a folder of their own session, which would rebuild the ops (about a minute
# each) in every session and xdist worker. Every test process uses this environment's usual folder instead.
if not os.environ.get("TORCH_EXTENSIONS_DIR"):
    from engine.runtime.op_builds import extensions_dir

    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions_dir())


def pytest_xdist_auto_num_workers(config) -> int:
    """`-n auto`: one worker per core, at most 4. Most tests run one single-threaded process, the
    distributed ones two; more workers than cores only adds contention, and each worker holds ~1 GB. The cores
    are those this process may run on (a container's or `taskset`'s), not the host's."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(cores, 4))


@pytest.hookimpl(tryfirst=True)  # before xdist's hook (the group marker) and the -m deselection
def pytest_collection_modifyitems(config, items) -> None:
    """Tests that use the pipeline run (`e2e_demo`) are the e2e tier and share one xdist worker, which builds
    it once."""
    for item in items:
        if {"e2e_demo", "e2e_grpo", "e2e_dpo"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.e2e)
            item.add_marker(pytest.mark.xdist_group("e2e"))


@pytest.fixture(scope="session")
def engine_cache(tmp_path_factory) -> Path:
    """One cache folder for the built-in tiny model for the whole test session."""
    return tmp_path_factory.mktemp("engine_cache")


@pytest.fixture(scope="session")
def run_step(engine_cache):
    """run_step(script, args, nprocs=1) -> CompletedProcess; nprocs > 1 uses `launcher` (deepspeed or torchrun);
    `env` adds variables to the offline environment; `umask` sets the process's (default: this one's)."""

    def run(script: str, args: list[str], nprocs: int = 1, timeout: int = 600, check: bool = True,
            launcher: str = "deepspeed", env: dict[str, str] | None = None, umask: int = -1):
        env = offline_env(engine_cache) | (env or {})
        if nprocs == 1:
            cmd = [sys.executable, str(ROOT / script)]
        elif launcher == "deepspeed":
            port = str(29500 + os.getpid() % 1000)
            cmd = ["deepspeed", "--num_gpus", str(nprocs), "--master_port", port, str(ROOT / script)]
        else:
            port = str(28500 + os.getpid() % 1000)
            cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nprocs),
                   "--master_port", port, str(ROOT / script)]
        from engine.runtime.distributed import shm_buffer_path

        # DeepSpeed's CPU all-reduce buffers of this launch (66 MB a rank in /dev/shm), named by the engine's rule.
        shm = [shm_buffer_path(r, {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}) for r in range(nprocs)
               ] if nprocs > 1 else []
        for stale in shm:
            stale.unlink(missing_ok=True)  # left by a run killed while it set up, or by an engine older than the fix
        proc = subprocess.run(cmd + ["--disable_tqdm", *args], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=timeout, umask=umask)
        if check and proc.returncode != 0:
            raise AssertionError(f"{script} failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-2000:]}")
        # The engine unlinks them once set up (engine/runtime/distributed.py): none may outlive the run.
        assert not (leaked := [path for path in shm if path.exists()]), f"left in /dev/shm: {leaked}"
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
    from engine.models import tiny

    old = os.environ.get("RLHF_ENGINE_CACHE")
    os.environ["RLHF_ENGINE_CACHE"] = str(engine_cache)
    try:
        return tiny.ensure_tiny_model(seed)
    finally:
        if old is None:
            del os.environ["RLHF_ENGINE_CACHE"]
        else:
            os.environ["RLHF_ENGINE_CACHE"] = old


def tiny_reward_folder(engine_cache: Path, folder: Path) -> Path:
    """A reward model made from the built-in model (a random value head) in `folder`: a step-3 critic
    without running step 2."""
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    actor = tiny_model_folder(engine_cache)
    with torch.random.fork_rng(devices=[]):  # the value head is new: the same one in every test session
        torch.manual_seed(0)
        head = AutoModelForSequenceClassification.from_pretrained(str(actor), num_labels=1)
    head.save_pretrained(str(folder))
    AutoTokenizer.from_pretrained(str(actor)).save_pretrained(str(folder))
    return folder


@pytest.fixture(scope="session")
def tiny_roles(engine_cache, tmp_path_factory) -> tuple[Path, Path]:
    """(actor folder, critic folder) for step-3 tests that need no trained model: the built-in model and a
    reward model made from it (a random value head)."""
    return tiny_model_folder(engine_cache), tiny_reward_folder(engine_cache, tmp_path_factory.mktemp("tiny_rm"))


def offline_env(engine_cache: Path) -> dict[str, str]:
    """The environment of a test subprocess: the test model cache, no hub, one thread per process."""
    return dict(os.environ, RLHF_ENGINE_CACHE=str(engine_cache), HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1",
                TOKENIZERS_PARALLELISM="false", OMP_NUM_THREADS="1")


# The pipeline test's size: the demo's steps 1 and 2 in full, step 3 stopped after this many PPO steps.
E2E_PPO_STEPS = 40


@pytest.fixture(scope="session")
def e2e_demo(engine_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(output folder, finished process) of `python e2e_rlhf.py` on the embedded default at a reduced size:
    two CPU ranks, steps 1 and 2 as in the demo, step 3 for E2E_PPO_STEPS steps, then evaluation and report.

    The step-3 tests that need no trained model use `tiny_roles` instead, so they need not wait for this run."""
    out = tmp_path_factory.mktemp("e2e")
    quiet = "--disable_tqdm"
    cmd = [sys.executable, str(ROOT / "e2e_rlhf.py"), "--output_dir", str(out), "--deployment-type", "cpu",
           f"--step1-args={quiet}", f"--step2-args={quiet}",
           f"--step3-args={quiet} --test_stop_step {E2E_PPO_STEPS} --eval_interval 20"]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(engine_cache), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"e2e_rlhf.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n{proc.stdout[-3000:]}")
    return out, proc


E2E_GRPO_STEPS = 50


@pytest.fixture(scope="session")
def e2e_grpo(e2e_demo, engine_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(output folder, finished process) of `python e2e_rlhf.py --algorithm grpo --step 3` at a reduced size
    (E2E_GRPO_STEPS steps) in a copy of the PPO pipeline's folder (its step-1 model and PPO actor), so that the
    GRPO actor is evaluated beside SFT and PPO without changing `e2e_demo`'s evaluation."""
    import shutil

    ppo, _ = e2e_demo
    out = tmp_path_factory.mktemp("e2e_grpo")
    for folder in ("step1_sft", "step3_rlhf"):
        shutil.copytree(ppo / folder, out / folder)
    cmd = [sys.executable, str(ROOT / "e2e_rlhf.py"), "--output_dir", str(out), "--deployment-type", "cpu",
           "--algorithm", "grpo", "--step", "3", f"--step3-args=--disable_tqdm --test_stop_step {E2E_GRPO_STEPS}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(engine_cache), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"e2e_rlhf.py --algorithm grpo failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                             f"{proc.stdout[-3000:]}")
    return out, proc


# The DPO pipeline test's size: DPO stopped after this many steps (of 100), the evaluation on this many held-out
# prompts (x 4 answers): 86 s on the 2 CPU cores at load 8, 57 s at load 5, most of it DPO's start-up and the
# evaluation of three actors.
E2E_DPO_STEPS = 50
E2E_DPO_PROMPTS = 100


@pytest.fixture(scope="session")
def e2e_dpo(e2e_demo, engine_cache, tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    """(output folder, finished process) of `python e2e_rlhf.py --algorithm dpo --step 2` at a reduced size
    (E2E_DPO_STEPS steps, E2E_DPO_PROMPTS evaluation prompts) in a copy of the PPO pipeline's folder (its step-1
    model and PPO actor), so that the DPO actor is evaluated beside SFT and PPO without changing `e2e_demo`'s
    evaluation."""
    import shutil

    ppo, _ = e2e_demo
    out = tmp_path_factory.mktemp("e2e_dpo")
    for folder in ("step1_sft", "step3_rlhf"):
        shutil.copytree(ppo / folder, out / folder)
    cmd = [sys.executable, str(ROOT / "e2e_rlhf.py"), "--output_dir", str(out), "--deployment-type", "cpu",
           "--algorithm", "dpo", "--step", "2", f"--step2-args=--disable_tqdm --test_stop_step {E2E_DPO_STEPS}",
           f"--eval-args=--eval_prompts {E2E_DPO_PROMPTS}"]
    proc = subprocess.run(cmd, cwd=ROOT, env=offline_env(engine_cache), capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise AssertionError(f"e2e_rlhf.py --algorithm dpo failed ({proc.returncode}):\n{proc.stderr[-4000:]}\n"
                             f"{proc.stdout[-3000:]}")
    return out, proc
