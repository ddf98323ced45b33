"""Step 3 on one CPU process, from the built-in model and a reward model made from it (`tiny_roles`): frozen
roles stay frozen, PTX mixes into the actor's updates, quantized roles (a QLoRA actor) run, save
full-precision models and resume bit for bit. (Bad input: the step-3 rows of tests/helpers/bad_input_cases.py;
that PPO learns the task: the pipeline test's step-3 run, tests/smoke/test_e2e_pipeline.py.)"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, offline_env, read_metrics

pytestmark = pytest.mark.smoke

TINY = ["--max_prompt_seq_len", "32", "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "32",
        "--per_device_training_batch_size", "16", "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-3",
        "--num_warmup_steps", "0", "--dtype", "fp32"]


def test_frozen_roles_do_not_change_while_the_actor_and_ema_do(tiny_roles, engine_cache):
    actor, critic = tiny_roles
    args = ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic), *TINY,
            "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2", "--enable_ema",
            "--ema_decay", "0.5", "--actor_learning_rate", "1e-2"]
    proc = subprocess.run([sys.executable, "-m", "tests.helpers.frozen_probe", *args], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env=offline_env(engine_cache))
    assert proc.returncode == 0 and "frozen ok" in proc.stdout, proc.stderr[-3000:]


def test_ptx_mixes_language_modelling_into_the_actor_updates(run_step, tiny_roles, tmp_path):
    actor, critic = tiny_roles
    text = tmp_path / "ptx.txt"
    text.write_text("\n".join(f"the digits {i} {i + 1} {i + 2} follow each other" for i in range(200)))
    out = tmp_path / "step3"
    run_step("step3_rlhf/main.py", ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path",
                                    str(critic), "--output_dir", str(out), *TINY, "--unsupervised_dataset_name",
                                    str(text), "--unsup_coef", "1.0", "--test_stop_step", "2", "--eval_prompts", "16"])
    steps = [r for r in read_metrics(out) if "ppo/ptx_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["ppo/ptx_loss"] > 0 for r in steps)


def test_accumulation_across_generation_batches_runs_as_deepspeed_chat(run_step, tiny_roles, tmp_path):
    """DeepSpeed-Chat's opt/single_gpu step-3 shape (one micro-batch per generation batch, accumulation 2, no
    tensor-parallel generation here): a PPO step collects 2 generation batches and ends on one optimizer step."""
    actor, critic = tiny_roles
    out = tmp_path / "step3"
    proc = run_step("step3_rlhf/main.py", [
        "--actor_model_name_or_path", str(actor), "--critic_model_name_or_path", str(critic), "--output_dir", str(out),
        *TINY, "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2",
        "--gradient_accumulation_steps", "2", "--test_stop_step", "2", "--eval_prompts", "2",
        "--inference_tp_size", "2", "--tp_gather_partition_size", "4"])
    log = proc.stdout + proc.stderr
    assert "so a PPO step collects 2 generation batches" in log
    assert "--inference_tp_size 2 and --tp_gather_partition_size 4 have no effect" in log
    # No --data_path: the log and config.yaml say the bundled task was used, not DeepSpeed-Chat's default.
    assert "no --data_path, so the bundled synthetic sorting task" in log
    assert (out / "config.yaml").read_text().startswith("# data: no --data_path, so the bundled synthetic sorting")
    rows = [r for r in read_metrics(out) if "ppo/policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["rollout/sequences"] == 4 for r in rows)  # 2 generation batches of 2 prompts


# ----------------------------------------------------------------------------------------------
# Quantized roles: 4-bit reference, 8-bit reward model, QLoRA actor (4-bit base + LoRA) and its EMA
# ----------------------------------------------------------------------------------------------
QLORA = ["--max_prompt_seq_len", "32", "--max_answer_seq_len", "8", "--per_device_generation_batch_size", "2",
         "--per_device_training_batch_size", "2", "--num_warmup_steps", "0", "--eval_prompts", "2",
         "--reference_quantization", "4bit", "--reward_quantization", "8bit", "--actor_quantization", "4bit",
         "--actor_lora_dim", "8", "--only_optimize_lora", "--actor_lora_learning_rate", "1e-2", "--actor_zero_stage",
         "2", "--enable_hybrid_engine", "--enable_ema", "--test_stop_step", "3", "--save_interval", "2"]


@pytest.fixture(scope="module")
def qlora_run(run_step, engine_cache, tmp_path_factory):
    """(actor folder, output folder) of a 3-step bf16 run with every role quantized that can be, from the
    built-in model and a reward model made from it (random value head): no step-1/step-2 run needed."""
    from tests.conftest import tiny_model_folder, tiny_reward_folder

    actor = tiny_model_folder(engine_cache)
    critic = tiny_reward_folder(engine_cache, tmp_path_factory.mktemp("tiny_rm"))
    out = tmp_path_factory.mktemp("qlora")
    run_step("step3_rlhf/main.py", ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path",
                                    str(critic), "--output_dir", str(out), *QLORA])
    return actor, critic, out


def test_qlora_run_logs_finite_losses_and_saves_a_full_precision_actor(qlora_run):
    import json
    import math

    from transformers import AutoModelForCausalLM

    base_folder, _, out = qlora_run
    rows = [r for r in read_metrics(out) if "ppo/policy_loss" in r]
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r[k]) for r in rows for k in ("ppo/policy_loss", "ppo/value_loss", "rollout/kl"))
    # The 4-bit reference is the actor's 4-bit base, and LoRA starts at zero: the first KL is exactly 0.
    assert rows[0]["rollout/kl"] == 0.0 and rows[-1]["rollout/kl"] != 0.0

    base = load_file(str(base_folder / "model.safetensors"))
    for role in ("actor", "actor_ema"):
        assert "quantization_config" not in json.loads((out / role / "config.json").read_text()), role
        model = AutoModelForCausalLM.from_pretrained(str(out / role))  # plain transformers: no bitsandbytes
        assert not [m for m in model.modules() if type(m).__module__.startswith("bitsandbytes")], role
        assert {p.dtype for p in model.parameters()} == {torch.bfloat16}, role
    saved = load_file(str(out / "actor" / "model.safetensors"))
    assert saved.keys() == base.keys()
    for name, weight in saved.items():
        original = base[name].to(torch.bfloat16)
        if not name.endswith("proj.weight"):  # embeddings, norms and the head: never quantized, never trained
            assert torch.equal(weight, original), name
            continue
        # Full-precision base + LoRA delta: the change has LoRA's rank (8), up to bf16 rounding, whereas the
        # base's 4-bit rounding is a full-rank change. 9th singular value over the first, measured: 0.015-0.037
        # here, 0.76-0.87 for the NF4 rounding error of the same weights.
        sv = torch.linalg.svdvals(weight.float() - original.float())
        assert sv[0] > 0 and sv[8] < 0.1 * sv[0], (name, sv[:10])


def test_qlora_run_resumes_bit_for_bit(qlora_run, run_step, tmp_path):
    import shutil

    actor, critic, straight = qlora_run
    resumed = tmp_path / "resumed"
    shutil.copytree(straight, resumed)  # its last checkpoint is step 2 (--save_interval 2)
    run_step("step3_rlhf/main.py", ["--actor_model_name_or_path", str(actor), "--critic_model_name_or_path",
                                    str(critic), "--output_dir", str(resumed), *QLORA, "--resume"])

    def step3(out):
        row = next(r for r in read_metrics(out) if r["step"] == 3 and "ppo/policy_loss" in r)
        return {k: v for k, v in row.items() if not k.startswith(("timing/", "perf/", "memory/", "startup/"))}

    # Bit for bit needs the same 4-bit numbers before and after a checkpoint save: on AVX512-BF16 CPUs
    # bitsandbytes' fused kernel broke that (see engine.models.load.use_dequantizing_4bit_matmul).
    assert step3(resumed) == step3(straight)
    for role in ("actor", "actor_ema"):
        a, b = (load_file(str(o / role / "model.safetensors")) for o in (straight, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), role
