"""Hand-worked checks of the step-3 benchmark's report math (engine/bench/figures.py), its model-shape scaling
(engine/bench/random_models.py) and its model-state count (engine/bench/role_memory.py)."""
from __future__ import annotations

import pytest
import torch

from engine.bench import figures
from engine.bench.random_models import scaled_config_dict
from engine.bench.role_memory import RoleMemoryTracker, role_memory
from engine.errors import UserError


# ------------------------------------------------------------------------------------------ rates
def test_rate_and_mfu():
    # 4 sequences x 64 answer tokens in 2 s = 128 tokens/s
    assert figures.rate(4 * 64, 2.0) == 128.0
    # 494.5 achieved of a 989 peak = 0.5
    assert figures.mfu(494.5, 989.0) == 0.5
    assert figures.mfu(494.5, None) is None
    with pytest.raises(ValueError):
        figures.rate(1.0, 0.0)


def test_roofline_of_a_7b_actor_on_an_h200():
    # 6.74e9 params x 2 bytes = 13.48e9 bytes; at 4800 GB/s: 13.48e9 / 4.8e12 = 2.808e-3 s per decode step
    param_bytes = 6.74e9 * 2
    assert figures.roofline_s(param_bytes, 4800.0) == pytest.approx(2.8083e-3, rel=1e-4)
    # a measured 14.04 ms step is 14.04e-3 / 2.8083e-3 = 5.0 times the roofline
    assert figures.roofline_ratio(14.0417e-3, param_bytes, 4800.0) == pytest.approx(5.0, rel=1e-4)
    assert figures.roofline_ratio(14.0e-3, param_bytes, None) is None


def test_default_peaks_by_device_name_and_dtype():
    assert figures.default_peak_tflops("NVIDIA H200", "bf16") == 989.0
    assert figures.default_peak_tflops("NVIDIA H100 80GB HBM3", "fp16") == 989.0
    assert figures.default_peak_tflops("NVIDIA H200", "fp32") is None  # not a tensor-core 16-bit run
    assert figures.default_peak_tflops("CPU: Xeon", "bf16") is None
    assert figures.default_hbm_gb_s("NVIDIA H200") == 4800.0
    assert figures.default_hbm_gb_s("NVIDIA H100 80GB HBM3") is None


def test_time_split_and_relative_error():
    # 3 + 1 + 4 = 8 s: 3/8, 1/8, 4/8
    assert figures.time_split({"generate": 3.0, "experience": 1.0, "train": 4.0}) == {
        "generate": 0.375, "experience": 0.125, "train": 0.5}
    # predicted 12 GB, measured 10 GB: +20 %; predicted 8: -20 %
    assert figures.relative_error(12.0, 10.0) == pytest.approx(0.2)
    assert figures.relative_error(8.0, 10.0) == pytest.approx(-0.2)
    assert figures.relative_error(8.0, None) is None and figures.relative_error(8.0, 0.0) is None


def _row(step: int, gen: float, exp: float, train: float, **extra: float) -> dict:
    return {"step": step, "timing/generate_s": gen, "timing/experience_s": exp, "timing/train_s": train,
            "perf/e2e_s": gen + exp + train, "rollout/sequences": 8.0, "rollout/response_len": 10.0,
            "memory/generate_peak_gb": 1.0, "memory/experience_peak_gb": 1.5, "memory/train_peak_gb": 2.0,
            "memory/current_gb": 1.2, "perf/gen_token_latency_s": 0.01, **extra}


def test_throughput_over_measured_steps_is_time_weighted():
    rows = [{"step": 0, "memory/baseline_gb": 0.5},
            _row(1, 9.0, 9.0, 9.0, **{"perf/samples_per_s": 1.0, "perf/train_tflops": 1.0, "perf/gen_tflops": 1.0,
                                      "perf/total_tflops": 1.0}),  # warm-up, dropped
            _row(2, 1.0, 0.5, 2.5, **{"perf/samples_per_s": 2.0, "perf/train_tflops": 10.0, "perf/gen_tflops": 4.0,
                                      "perf/total_tflops": 6.0}),
            _row(3, 3.0, 0.5, 0.5, **{"perf/samples_per_s": 4.0, "perf/train_tflops": 20.0, "perf/gen_tflops": 8.0,
                                      "perf/total_tflops": 2.0})]
    steps = figures.measured_steps(rows, warmup_steps=1)
    assert [r["step"] for r in steps] == [2, 3]
    out = figures.throughput(steps, seq_length=32, ppo_epochs=2, peak_tflops=40.0)
    # samples/s weighted by e2e (4 s and 4 s): (2*4 + 4*4) / 8 = 3
    assert out["samples_per_s"] == pytest.approx(3.0)
    # generated tokens: 2 steps x 8 sequences x 10 tokens = 160 in 1 + 3 = 4 s: 40 tokens/s
    assert out["gen_tokens_per_s"] == pytest.approx(40.0)
    # trained tokens: 16 sequences x 2 epochs x 32 = 1024 in 2.5 + 0.5 = 3 s
    assert out["train_tokens_per_s"] == pytest.approx(1024 / 3)
    # train TFLOPs weighted by train seconds: (10*2.5 + 20*0.5) / 3 = 35/3; gen: (4*1 + 8*3) / 4 = 7
    assert out["train_tflops"] == pytest.approx(35 / 3)
    assert out["gen_tflops"] == pytest.approx(7.0)
    assert out["total_tflops"] == pytest.approx(4.0)  # (6*4 + 2*4) / 8
    assert out["mfu"]["gen"] == pytest.approx(7.0 / 40.0)
    assert figures.throughput(steps, seq_length=32, ppo_epochs=2, peak_tflops=None)["mfu"] is None
    # time per trained sample: 4 + 4 = 8 s over 2 steps x 32 rows (8 prompts x 4 answers) = 0.125 s, each row
    # counted once whatever ppo_epochs; unknown without the rows per step
    per_row = figures.throughput(steps, seq_length=32, ppo_epochs=2, peak_tflops=None, trained_samples_per_step=32)
    assert per_row["s_per_trained_sample"] == pytest.approx(8 / 64) and per_row["trained_samples_per_step"] == 32
    assert out["s_per_trained_sample"] is None

    times = figures.phase_times(steps)
    # means: generate (1+3)/2 = 2, experience 0.5, train (2.5+0.5)/2 = 1.5; total 4
    assert times["seconds"] == {"generate": 2.0, "experience": 0.5, "train": 1.5}
    assert times["fractions"]["generate"] == pytest.approx(0.5)
    assert sum(times["fractions"].values()) == pytest.approx(1.0)


def test_memory_peaks_and_cpu_growth_over_baseline():
    rows = [_row(1, 1, 1, 1), _row(2, 1, 1, 1, **{"memory/train_peak_gb": 3.0})]
    out = figures.memory_peaks(rows, baseline_gb=0.5, on_cpu=True)
    assert out["peak_gb"] == {"generate": 1.0, "experience": 1.5, "train": 3.0}
    assert out["growth_gb"] == {"generate": 0.5, "experience": 1.0, "train": 2.5}
    assert figures.memory_peaks(rows, baseline_gb=0.0, on_cpu=False)["growth_gb"] is None


def test_planner_errors_compare_like_with_like():
    gib = 2**30
    zero = {"gpu": 0, "cpu": 0}
    measured = figures.role_gb({"reference": {"parameters": {"gpu": 0, "cpu": 2 * gib}, "gradients": zero,
                                              "buffers": zero, "optimizer": zero}})
    assert measured["reference"]["total"] == {"gpu": 0.0, "cpu": 2.0}
    planner = {"peak_gb": {"generate": 3.0, "experience": 4.0, "train": 6.0},
               "roles": {"reference": {"parameters": 2.5}}}
    errors = figures.planner_errors(planner, {"generate": 2.0, "experience": 4.0, "train": 8.0}, measured, on_cpu=True)
    # (3-2)/2 = +0.5, (4-4)/4 = 0, (6-8)/8 = -0.25; role: (2.5-2)/2 = +0.25 (host bytes count on CPU)
    assert errors["peak_gb"] == {"generate": 0.5, "experience": 0.0, "train": -0.25}
    assert errors["roles"]["reference"]["parameters"] == pytest.approx(0.25)
    # On a GPU only accelerator bytes count: measured 0 -> no error defined
    assert figures.planner_errors(planner, None, measured, on_cpu=False)["roles"]["reference"]["parameters"] is None


def test_compare_table_gives_ratios_against_the_first():
    def report(samples: float, step_s: float) -> dict:
        return {"config": {"step3_flags": []}, "throughput": {"samples_per_s": samples},
                "decode": {"step_s": step_s}}

    table = figures.compare_markdown([report(4.0, 0.02), report(6.0, 0.01)], ["a", "b"])
    assert "| samples/s | 4 | 6 (1.50x) |" in table
    assert "| decode step s | 0.02 | 0.01 (0.50x) |" in table
    assert "training tokens/s" not in table  # rows no report has are left out
    with pytest.raises(ValueError):
        figures.compare_markdown([report(1.0, 1.0)], ["a"])


def test_compare_json_and_model_states_of_ppo_against_a_critic_free_run():
    gib = 2**30
    zero = {"gpu": 0, "cpu": 0}

    def roles(*names: str) -> dict:
        # 1 GiB of parameters on the host and 3 GiB of optimizer states on the accelerator per role
        return figures.role_gb({n: {"parameters": {"gpu": 0, "cpu": gib}, "gradients": zero, "buffers": zero,
                                    "optimizer": {"gpu": 3 * gib, "cpu": 0}} for n in names})

    ppo_roles, grpo_roles = roles("actor", "critic", "reference"), roles("actor", "reference")
    # 3 roles x (1 + 3) GiB = 12; 2 roles = 8
    assert figures.model_states_gb(ppo_roles) == 12.0 and figures.model_states_gb(grpo_roles) == 8.0
    ppo = {"config": {"step3_flags": []}, "throughput": {"s_per_trained_sample": 0.5},
           "memory": {"roles": ppo_roles, "model_states_gb": 12.0}}
    grpo = {"config": {"step3_flags": ["--advantage_estimator", "grpo"], "advantage_estimator": "grpo",
                       "n_samples_per_prompt": 4}, "throughput": {"s_per_trained_sample": 0.25},
            "memory": {"roles": grpo_roles, "model_states_gb": 8.0}}
    out = figures.compare_json([ppo, grpo], ["ppo", "grpo"])
    assert out["runs"]["ppo"] == {"advantage_estimator": "gae", "n_samples_per_prompt": 1,
                                  "roles": ["actor", "critic", "reference"], "step3_flags": []}
    assert out["runs"]["grpo"]["roles"] == ["actor", "reference"]
    assert out["values"]["model states GB (all roles)"] == {"ppo": 12.0, "grpo": 8.0}
    # 8 / 12 = 0.667 of PPO's model states; 0.25 / 0.5 = half the time per trained sample
    assert out["ratios_to_reference"]["model states GB (all roles)"]["grpo"] == pytest.approx(2 / 3)
    assert out["ratios_to_reference"]["s per trained sample"] == {"ppo": 1.0, "grpo": 0.5}
    assert out["values"]["critic states GB (gpu)"] == {"ppo": 3.0, "grpo": None}  # the critic-free run has none
    assert "samples/s" not in out["values"]  # figures no run has are left out


# ------------------------------------------------------------------------------------------ shapes
LLAMA = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
         "num_attention_heads": 32, "num_key_value_heads": 32, "head_dim": 128, "vocab_size": 32000}


def test_scaling_a_llama_keeps_multi_head_attention_and_head_dim_consistent():
    out = scaled_config_dict(LLAMA, num_layers=2, hidden_size=256, intermediate_size=688, num_heads=4)
    assert (out["num_hidden_layers"], out["hidden_size"], out["intermediate_size"]) == (2, 256, 688)
    assert (out["num_attention_heads"], out["num_key_value_heads"], out["head_dim"]) == (4, 4, 64)  # 256 / 4
    assert out["vocab_size"] == 32000 and LLAMA["hidden_size"] == 4096  # the input is not changed


def test_scaling_a_grouped_query_model_keeps_its_group():
    qwen = {"model_type": "qwen2", "hidden_size": 3584, "num_attention_heads": 28, "num_key_value_heads": 4,
            "num_hidden_layers": 28, "layer_types": ["full_attention"] * 28, "max_window_layers": 28}
    out = scaled_config_dict(qwen, num_heads=14, hidden_size=896, num_layers=3)
    assert out["num_key_value_heads"] == 2  # 7 query heads per KV head: 14 / 7
    assert out["layer_types"] == ["full_attention"] * 3 and out["max_window_layers"] == 3
    with pytest.raises(UserError, match="multiple of 7"):
        scaled_config_dict(qwen, num_heads=8, hidden_size=896)


def test_scaling_opt_and_refusals():
    opt = {"model_type": "opt", "hidden_size": 2048, "ffn_dim": 8192, "num_hidden_layers": 24,
           "num_attention_heads": 32, "word_embed_proj_dim": 2048}
    out = scaled_config_dict(opt, hidden_size=256, intermediate_size=1024, num_heads=4)
    assert (out["ffn_dim"], out["word_embed_proj_dim"]) == (1024, 256)
    with pytest.raises(UserError, match="not a multiple of 3 attention heads"):
        scaled_config_dict(opt, hidden_size=256, num_heads=3)
    with pytest.raises(UserError, match="positive"):
        scaled_config_dict(opt, num_layers=0)


# ------------------------------------------------------------------------------------------ model states
class _Role:
    """The two attributes of a DeepSpeed engine the count reads, and its step()."""

    def __init__(self, module: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None):
        self.module, self.optimizer = module, optimizer

    def step(self) -> None:
        self.optimizer.step()


def test_role_memory_of_a_plain_adamw_role():
    # Linear(4, 3): weight 12 + bias 3 = 15 fp32 parameters = 60 bytes; gradients 60 bytes;
    # AdamW after one step: exp_avg + exp_avg_sq = 2 x 60 = 120 bytes, plus a 4-byte `step` per tensor = 128.
    torch.manual_seed(0)
    module = torch.nn.Linear(4, 3)
    role = _Role(module, torch.optim.AdamW(module.parameters()))
    tracker = RoleMemoryTracker({"actor": role, "frozen": _Role(torch.nn.Linear(2, 2)), "absent": None})
    tracker.watch_steps()
    module(torch.ones(2, 4)).sum().backward()
    role.step()
    module.zero_grad(set_to_none=True)  # gradients are gone after the step; the peak keeps them
    peaks = tracker.finish()
    assert peaks["actor"]["parameters"]["cpu"] == 60
    assert peaks["actor"]["gradients"]["cpu"] == 60
    assert peaks["actor"]["optimizer"]["cpu"] == 128
    # Linear(2, 2): 4 + 2 = 6 fp32 parameters = 24 bytes, nothing else
    assert peaks["frozen"] == {"parameters": {"gpu": 0, "cpu": 24}, "gradients": {"gpu": 0, "cpu": 0},
                               "buffers": {"gpu": 0, "cpu": 0}, "optimizer": {"gpu": 0, "cpu": 0}}
    assert "absent" not in peaks and "step" not in vars(role)  # the counting wrapper is gone
    assert role_memory(role)["gradients"]["cpu"] == 0 and role_memory(role)["optimizer"]["cpu"] == 128
