"""Step 3 on one CPU process: frozen roles stay frozen, bad input is refused, quantized roles (a QLoRA actor)
run, save full-precision models and resume bit for bit. (That PPO learns the task is
checked on the pipeline test's step-3 run, tests/smoke/test_e2e_pipeline.py.)"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import ROOT, read_metrics

pytestmark = pytest.mark.smoke

TINY = ["--max_prompt_seq_len", "32", "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "32",
        "--per_device_training_batch_size", "16", "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-3",
        "--num_warmup_steps", "0", "--dtype", "fp32"]

FROZEN_PROBE = r"""
import sys, torch
from engine.config import Step3Config, parse_config
from engine.runtime.distributed import init_distributed
from engine.models.roles import build_roles, load_step3_tokenizer, resolve_paths
from engine.ppo.trainer import PPOTrainer
from engine.data.prompts import collate_left_padded

cfg = parse_config(Step3Config, sys.argv[1:])
dist = init_distributed(cfg.train.seed)
actor_path, critic_path = resolve_paths(cfg, dist)
tok = load_step3_tokenizer(cfg, actor_path, critic_path)
roles = build_roles(cfg, dist, tok, actor_path, critic_path, total_steps=10, ptx=False)
frozen = {"ref": roles.ref, "reward": roles.reward, "ema": roles.ema}
for name, engine in frozen.items():
    assert engine.optimizer is None, name
    assert not engine.module.training, name
    assert not any(p.requires_grad for p in engine.module.parameters()), name
before = {name: [p.detach().clone() for p in e.module.parameters()] for name, e in frozen.items()}
actor_before = [p.detach().clone() for p in roles.actor.module.parameters()]
trainer = PPOTrainer(cfg, roles, tok, dist)
prompts = [tok(" Human: sort 3 1 2 Assistant:")["input_ids"], tok(" Human: sort 9 8 7 6 Assistant:")["input_ids"]]
batch = collate_left_padded([torch.tensor(p) for p in prompts], tok.pad_token_id, cfg.data.max_prompt_seq_len)
for _ in range(3):
    exp, _ = trainer.experience(trainer.generate(batch), batch["attention_mask"])
    trainer.train_micro_batch(exp)
    trainer.update_ema()
for name, engine in frozen.items():
    assert not engine.module.training, name
    if name != "ema":  # the EMA is frozen to the optimizer but moves towards the actor
        for a, b in zip(before[name], engine.module.parameters()):
            assert torch.equal(a, b), name
ema_moved = any(not torch.equal(a, b) for a, b in zip(before["ema"], roles.ema.module.parameters()))
actor_moved = any(not torch.equal(a, b) for a, b in zip(actor_before, roles.actor.module.parameters()))
assert actor_moved and ema_moved
print("frozen ok")
"""


def test_frozen_roles_do_not_change_while_the_actor_and_ema_do(rlhf_inputs, engine_cache):
    sft, rm = rlhf_inputs
    args = ["--actor_model_name_or_path", str(sft), "--critic_model_name_or_path", str(rm), *TINY,
            "--per_device_generation_batch_size", "2", "--per_device_training_batch_size", "2", "--enable_ema",
            "--ema_decay", "0.5", "--actor_learning_rate", "1e-2"]
    proc = subprocess.run([sys.executable, "-c", FROZEN_PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env={**__import__("os").environ, "RLHF_ENGINE_CACHE": str(engine_cache)})
    assert proc.returncode == 0 and "frozen ok" in proc.stdout, proc.stderr[-3000:]


BAD = {
    "missing actor folder": lambda sft, rm, t: (["--actor_model_name_or_path", str(t / "none")],
                                                "--actor_model_name_or_path"),
    "missing critic folder": lambda sft, rm, t: (["--critic_model_name_or_path", str(t / "none")],
                                                 "run step 2 first"),
    "critic is not a reward model": lambda sft, rm, t: (["--critic_model_name_or_path", str(sft)],
                                                        "is not a reward model"),
    "every prompt too long": lambda sft, rm, t: (["--max_prompt_seq_len", "3"], "fits --max_prompt_seq_len 3"),
    "longer than the actor's context": lambda sft, rm, t: (["--max_prompt_seq_len", "400", "--max_answer_seq_len",
                                                            "200"], "exceeds the actor's context of 512 tokens"),
    "incompatible role settings": lambda sft, rm, t: (["--offload_reference_model"],
                                                      "--offload_reference_model needs --actor_zero_stage 3"),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_input_is_refused_cleanly(case, run_step, rlhf_inputs, tmp_path):
    sft, rm = rlhf_inputs
    args, message = BAD[case](sft, rm, tmp_path)
    out = tmp_path / "out"
    base = ["--actor_model_name_or_path", str(sft), "--critic_model_name_or_path", str(rm), *TINY]
    proc = run_step("step3_rlhf/main.py", ["--output_dir", str(out), *base, *args], check=False)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert message in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    assert not out.exists() or not any(out.iterdir())


def test_ptx_mixes_language_modelling_into_the_actor_updates(run_step, rlhf_inputs, tmp_path):
    sft, rm = rlhf_inputs
    text = tmp_path / "ptx.txt"
    text.write_text("\n".join(f"the digits {i} {i + 1} {i + 2} follow each other" for i in range(200)))
    out = tmp_path / "step3"
    run_step("step3_rlhf/main.py", ["--actor_model_name_or_path", str(sft), "--critic_model_name_or_path", str(rm),
                                    "--output_dir", str(out), *TINY, "--unsupervised_dataset_name", str(text),
                                    "--unsup_coef", "1.0", "--test_stop_step", "2", "--eval_prompts", "16"])
    steps = [r for r in read_metrics(out) if "ppo/ptx_loss" in r]
    assert [r["step"] for r in steps] == [1, 2] and all(r["ppo/ptx_loss"] > 0 for r in steps)


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
        return {k: v for k, v in row.items() if not k.startswith(("timing/", "perf/", "memory/"))}

    # Bit for bit needs the same 4-bit numbers before and after a checkpoint save: on AVX512-BF16 CPUs
    # bitsandbytes' fused kernel broke that (see engine.models.load.use_dequantizing_4bit_matmul).
    assert step3(resumed) == step3(straight)
    for role in ("actor", "actor_ema"):
        a, b = (load_file(str(o / role / "model.safetensors")) for o in (straight, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a), role
