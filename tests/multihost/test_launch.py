"""Steps launched across two hosts as users launch them, one rank per host: `torchrun` on each node and
DeepSpeed's launcher with a hostfile (pdsh over ssh). Each run equals a one-host run with the same world size
(fp32 on CPU; the reductions run in another order over the link, hence a tolerance). Step 1 keeps
--output_dir (and so the data cache and checkpoints) on each host's own disk and resumes from there."""
from __future__ import annotations

import json
import math
import re

import pytest

from tests.conftest import eval_rows, offline_env, read_metrics, tiny_model_folder, train_losses
from tests.distributed.test_step3_grpo_two_ranks import ARGS as GRPO_ARGS
from tests.distributed.test_step3_two_ranks import ARGS as PPO_ARGS
from tests.helpers.multinode import deepspeed_hostfile, one_host, torchrun

pytestmark = pytest.mark.multihost

STEP1 = ["--zero_stage", "3", "--dtype", "fp32", "--per_device_train_batch_size", "8", "--max_seq_len", "64",
         "--save_interval", "2"]
SAME = {"rel": 1e-5, "abs": 1e-6}  # fp32 sums over 2 ranks in another order: measured differences below 1e-6


def _ok(results) -> None:
    for node in results if isinstance(results, list) else [results]:
        assert node.returncode == 0, f"{node.host} failed ({node.returncode}):\n{node.output[-4000:]}"
        assert "Traceback" not in node.output, node.output[-4000:]


def _step3_rows(out) -> dict[int, dict]:
    keep = ("ppo/", "rollout/", "grpo/", "reward/")
    return {r["step"]: {k: v for k, v in r.items() if k.startswith(keep)} for r in read_metrics(out)
            if "rollout/score_mean" in r or "rollout/reward_mean" in r}


def _assert_same_rows(a: dict[int, dict], b: dict[int, dict]) -> None:
    assert sorted(a) == sorted(b) and a
    for step in a:
        assert a[step].keys() == b[step].keys() and a[step], step
        assert a[step] == pytest.approx(b[step], **SAME), step


def test_step1_torchrun_node_local_disks_resume_equals_one_host(make_hosts, engine_cache, tmp_path):
    """Step 1, ZeRO-3 fp32, --output_dir on each host's own disk: 2 steps, then --resume to step 4; steps 1-4 equal
    a one-host run's, each host built its own data cache and sealed its own checkpoint copy."""
    local = tmp_path / "local"  # the same path on both hosts, each its own disk
    hosts = make_hosts(2, private=[local])
    disks = [h.private[local] / "sft" for h in hosts]  # each host's output folder as this machine sees it
    env = offline_env(engine_cache)
    args = [*STEP1, "--output_dir", str(local / "sft")]
    _ok(torchrun(hosts, "step1_sft/main.py", [*args, "--test_stop_step", "2"], env, tmp_path / "logs"))
    for rank, disk in enumerate(disks):
        assert len(list((disk / "data_cache").glob("sft_*.safetensors"))) == 1, rank
        files = json.loads((disk / "ds_checkpoint" / "step2" / "manifest.json").read_text())["files"]
        assert f"step2/rng_rank{rank}.safetensors" in files and f"step2/rng_rank{1 - rank}.safetensors" not in files
    assert (disks[0] / "model.safetensors").is_file() and not (disks[1] / "model.safetensors").exists()

    resumed = torchrun(hosts, "step1_sft/main.py", [*args, "--resume", "--test_stop_step", "4"], env,
                       tmp_path / "logs_resume")
    _ok(resumed)
    assert "resumed from" in resumed[0].output
    one = tmp_path / "one_host"
    _ok(one_host(hosts, "step1_sft/main.py", [*STEP1, "--test_stop_step", "4", "--output_dir", str(one)], env,
                 tmp_path / "logs_one"))
    two = train_losses(disks[0])
    assert sorted(two) == [1, 2, 3, 4]
    assert two == pytest.approx(train_losses(one), **SAME)
    evals = {r["step"]: r["eval/loss"] for r in eval_rows(disks[0])}
    assert evals and evals == pytest.approx({r["step"]: r["eval/loss"] for r in eval_rows(one)}, **SAME)


def test_step3_ppo_deepspeed_hostfile_equals_one_host(hosts, tiny_roles, engine_cache, tmp_path):
    """PPO with ZeRO-3, hybrid generation and LoRA, by `deepspeed --hostfile` on a shared --output_dir."""
    actor, critic = tiny_roles
    args = ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic), *PPO_ARGS,
            "--test_stop_step", "2"]
    two, one = tmp_path / "two_hosts", tmp_path / "one_host"
    _ok(deepspeed_hostfile(hosts, "step3_rlhf/main.py", [*args, "--output_dir", str(two)], offline_env(engine_cache),
                           tmp_path / "launch"))
    _ok(one_host(hosts, "step3_rlhf/main.py", [*args, "--output_dir", str(one)], offline_env(engine_cache),
                 tmp_path / "logs_one"))
    _assert_same_rows(_step3_rows(two), _step3_rows(one))


def test_step3_grpo_torchrun_trains_across_hosts(hosts, engine_cache, tmp_path):
    """A critic-free estimator (GRPO) with ZeRO-3, hybrid generation and LoRA, by `torchrun` on each host: both
    ranks sample (each its own stream: the answers differ) and train. Its equality to one host is PPO's above:
    the estimator is per-rank math on the same collectives."""
    args = ["--actor_model_name_or_path", str(tiny_model_folder(engine_cache)), *GRPO_ARGS, "--test_stop_step", "2",
            "--output_dir", str(tmp_path / "two_hosts")]
    nodes = torchrun(hosts, "step3_rlhf/main.py", args, offline_env(engine_cache), tmp_path / "logs")
    _ok(nodes)
    answers = [re.findall(rf"\[rank {rank}\] answer: (.*) \(score", node.output) for rank, node in enumerate(nodes)]
    assert len(answers[0]) == len(answers[1]) == 2 and answers[0] != answers[1], answers
    rows = _step3_rows(tmp_path / "two_hosts")
    assert sorted(rows) == [1, 2] and all(math.isfinite(v) for row in rows.values() for v in row.values()), rows
