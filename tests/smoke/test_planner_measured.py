"""The planner against reality: per-phase peak memory of a step-3 run on CPU vs its prediction.

A random Llama (hidden 512, 4 layers, vocabulary 8192) as actor and critic, fp32, one rank, 8
prompts of 64 tokens and answers of up to 64. Measured: the process's peak RSS in each phase of PPO
step 2 (step 1 has no optimizer states yet: DeepSpeed makes them at the first update) minus the RSS
just before the models were built. glibc's malloc keeps freed blocks below its adaptive mmap
threshold (up to 32 MiB) in its heap, where they still count as RSS; MALLOC_MMAP_THRESHOLD_=65536
fixes the threshold so freed tensors leave the RSS, as freed CUDA memory leaves max_memory_allocated.

Errors measured on 2 cores (predicted - measured) / measured, generate / experience / train: this
test -17% / -17% / +4%; the same shape with 128 + 128 tokens -10% / -12% / +8%, with ZeRO-2
+8% / +3% / +17%. bf16 on CPU under-predicts generation by up to 40% on this small shape: bf16 runs
hold about 0.09 GiB more between steps that is not model state (the roles measure as predicted when
built), so the test runs fp32. A smaller shape (hidden 384) gives -25% for generation: the part of
the RSS no tensor accounts for (allocator arenas, runtime buffers) weighs more there. BOUND is the
error this test accepts.

The GRPO case (no critic, no reward model, the reference for a KL loss; 2 prompts x 4 answers, the same 8 rows
per generation batch as PPO's 8 prompts) measured -29.4% / -27.0% / -1.7% (2026-12-07, 2 shared cores). In GB
over the baseline, step 2: measured 0.483 / 0.588 / 0.758 against 0.341 / 0.429 / 0.746 predicted. The planner
misses the same ~0.14 GB in generation and experience as in the PPO case (measured there 0.731 / 0.838 / 1.009,
-19.0% / -18.8% / +5.0% in the same session), but without a critic and a reward model the run holds less, so
the same gap is a larger fraction; training, where the actor's gradients and Adam states dominate, is within
2%. GRPO_BOUND = 0.35 accepts that gap with 5 points of margin and still fails a planner that drops a role.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import read_metrics

pytestmark = pytest.mark.smoke

BOUND = 0.25
GRPO_BOUND = 0.35
SHAPE = dict(hidden_size=512, intermediate_size=1376, num_hidden_layers=4, num_attention_heads=8,
             num_key_value_heads=8, max_position_embeddings=256, tie_word_embeddings=False, vocab_size=8192)


# GRPO as the GRPO recipes run it: no critic, no reward model (a length reward, by file path: the step runs in a
# subprocess that cannot import the `tests` package), KL as a loss term, so the reference is built; 2 prompts x 4
# answers = the 8 rows a PPO generation batch has here.
LENGTH = f"{Path(__file__).resolve().parents[1] / 'helpers' / 'toy_rewards.py'}:answer_length"
GRPO = ["--advantage_estimator", "grpo", "--n_samples_per_prompt", "4", "--reward_funcs", LENGTH, "--kl_ctl", "0",
        "--kl_loss_coef", "0.001", "--per_device_generation_batch_size", "2"]
CASES = {"fp32-zero0": (["--per_device_generation_batch_size", "8"], True, BOUND),
         "fp32-zero0-grpo": (GRPO, False, GRPO_BOUND)}


@pytest.mark.parametrize(("flags", "with_critic", "bound"), list(CASES.values()), ids=list(CASES))
def test_predicted_phase_peaks_within_bound_of_measured(flags, with_critic, bound, run_step, engine_cache, tmp_path):
    from transformers import LlamaConfig

    from engine.bench.random_models import embedded_tokenizer, ensure_random_model
    from engine.config import Step3Config
    from engine.flags import parse_config
    from engine.planner.step3 import predict_for_step3

    tok = embedded_tokenizer()
    config = LlamaConfig(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
                         **SHAPE)
    models = ["--actor_model_name_or_path", str(ensure_random_model(config, "actor", "fp32", 0, tmp_path))]
    if with_critic:
        models += ["--critic_model_name_or_path", str(ensure_random_model(config, "critic", "fp32", 0, tmp_path))]
    args = [*models, "--dtype", "fp32", "--max_prompt_seq_len", "64", "--max_answer_seq_len", "64",
            "--per_device_training_batch_size", "8", "--num_warmup_steps", "0", "--eval_prompts", "8", *flags]
    out = tmp_path / "out"
    run_step("step3_rlhf/main.py", ["--output_dir", str(out), "--test_stop_step", "2", *args],
             env={"MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"})
    rows = read_metrics(out)
    baseline = next(r["memory/baseline_gb"] for r in rows if "memory/baseline_gb" in r)
    step2 = [r for r in rows if "memory/train_peak_gb" in r][1]
    prediction = predict_for_step3(parse_config(Step3Config, args), world_size=1, merge_host=True)
    # the planner plans the roles the run builds: GRPO here has neither critic nor reward model
    assert {r for r, parts in prediction["roles"].items() if any(parts.values())} == (
        {"actor", "critic", "reference", "reward"} if with_critic else {"actor", "reference"})
    predicted = prediction["peak_gb"]
    errors = {}
    for phase in ("generate", "experience", "train"):
        measured = step2[f"memory/{phase}_peak_gb"] - baseline
        errors[phase] = (predicted[phase] - measured) / measured
    print("planner error per phase:", {k: f"{v:+.1%}" for k, v in errors.items()})
    assert all(abs(e) <= bound for e in errors.values()), errors
    # the phases differ enough that a flat guess would fail: training needs the most, generation the least
    assert step2["memory/train_peak_gb"] > step2["memory/experience_peak_gb"] > step2["memory/generate_peak_gb"]
