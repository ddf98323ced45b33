"""Step 3 on one CPU process: frozen roles stay frozen, bad input is refused. (That PPO learns the task is
checked on the pipeline test's step-3 run, tests/smoke/test_e2e_pipeline.py.)"""
from __future__ import annotations

import subprocess
import sys

import pytest

from tests.conftest import ROOT, read_metrics

pytestmark = pytest.mark.smoke

TINY = ["--max_prompt_seq_len", "32", "--max_answer_seq_len", "16", "--per_device_generation_batch_size", "32",
        "--per_device_training_batch_size", "16", "--actor_learning_rate", "1e-4", "--critic_learning_rate", "1e-3",
        "--num_warmup_steps", "0", "--dtype", "fp32"]

FROZEN_PROBE = r"""
import sys, torch
from engine.config import Step3Config, parse_config
from engine.distributed import init_distributed
from engine.rlhf_engine import build_roles, load_step3_tokenizer, resolve_paths
from engine.ppo_trainer import PPOTrainer
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
