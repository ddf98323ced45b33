"""Hand-worked checks of the DeepSpeed-Chat throughput formulas and the memory / timer helpers."""
from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import GPT2Config, LlamaConfig, OPTConfig

from engine.observe.perf import (
    StepTimer,
    activation_factor,
    calculate_flops,
    current_memory_gb,
    model_shape,
    peak_memory_gb,
    reset_peak_memory,
    train_throughput,
)


def test_calculate_flops_hand_worked():
    # k=3, B=2, s=8, L=2, h=4, V=10
    # 24 * 3 * 2 * 8 * 2 * 4^2 = 36864
    # 1 + s/(6h) + V/(16 L h) = 1 + 8/24 + 10/128 = 1 + 1/3 + 0.078125
    # 36864 * (1 + 1/3 + 0.078125) = 36864 + 12288 + 2880 = 52032
    assert calculate_flops(3, 2, 8, 2, 4, 10) == pytest.approx(52032.0)


def test_calculate_flops_scales_linearly_with_batch_and_factor():
    one = calculate_flops(3, 1, 8, 2, 4, 10)
    assert calculate_flops(3, 5, 8, 2, 4, 10) == pytest.approx(5 * one)
    assert calculate_flops(4, 1, 8, 2, 4, 10) == pytest.approx(one * 4 / 3)


@pytest.mark.parametrize("ckpt, lora_dim, hidden, expected", [
    (False, 0, 64, 3.0),
    (True, 0, 64, 4.0),
    # LoRA: k -= 1 - 2 r / h = 1 - 2*8/64 = 0.75
    (False, 8, 64, 2.25),
    (True, 8, 64, 3.25),
    # r = h/2: 1 - 2*32/64 = 0, no change
    (False, 32, 64, 3.0),
])
def test_activation_factor(ckpt, lora_dim, hidden, expected):
    assert activation_factor(ckpt, lora_dim, hidden) == pytest.approx(expected)


def test_activation_factor_rejects_bad_input():
    with pytest.raises(ValueError, match="lora_dim"):
        activation_factor(False, -1, 64)
    with pytest.raises(ValueError, match="hidden_size"):
        activation_factor(False, 0, 0)


def test_model_shape_llama_gpt2_opt():
    llama = LlamaConfig(num_hidden_layers=2, hidden_size=64, vocab_size=100, intermediate_size=128,
                        num_attention_heads=4)
    gpt2 = GPT2Config(n_layer=3, n_embd=32, vocab_size=50, n_head=2, bos_token_id=0, eos_token_id=0)
    opt = OPTConfig(num_hidden_layers=4, hidden_size=16, vocab_size=70, ffn_dim=32, num_attention_heads=2,
                    word_embed_proj_dim=16)
    assert model_shape(llama) == (2, 64, 100)
    assert model_shape(gpt2) == (3, 32, 50)
    assert model_shape(opt) == (4, 16, 70)


def test_model_shape_plain_namespace_and_missing_field():
    assert model_shape(SimpleNamespace(n_layer=6, d_model=128, vocab_size=1000)) == (6, 128, 1000)
    with pytest.raises(ValueError, match="hidden_size"):
        model_shape(SimpleNamespace(num_hidden_layers=2, vocab_size=10))


def test_train_throughput_hand_worked():
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=4, vocab_size=10)
    out = train_throughput(step_time_s=0.5, per_device_batch=2, world_size=4, seq_length=8, hf_config=cfg,
                           gradient_checkpointing=False, lora_dim=0)
    # samples/s (global) = 2 * 4 / 0.5 = 16
    # flops(k=3, B=2, s=8, L=2, h=4, V=10) = 52032 (see above); per-device TFLOPs = 52032 / (0.5 * 1e12)
    assert out == pytest.approx({"perf/samples_per_s": 16.0, "perf/tflops": 1.04064e-7, "perf/step_time_s": 0.5})


def test_train_throughput_does_not_depend_on_world_size_per_device():
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=4, vocab_size=10)
    kwargs = dict(step_time_s=1.0, per_device_batch=2, seq_length=8, hf_config=cfg, gradient_checkpointing=True,
                  lora_dim=0)
    one, eight = train_throughput(world_size=1, **kwargs), train_throughput(world_size=8, **kwargs)
    assert eight["perf/tflops"] == pytest.approx(one["perf/tflops"])  # per device: DS-Chat would divide by 8
    assert eight["perf/samples_per_s"] == pytest.approx(8 * one["perf/samples_per_s"])
    # k = 4 with checkpointing: 52032 * 4/3 = 69376
    assert one["perf/tflops"] == pytest.approx(69376 / 1e12)


def test_train_throughput_rejects_zero_time():
    cfg = SimpleNamespace(num_hidden_layers=2, hidden_size=4, vocab_size=10)
    with pytest.raises(ValueError, match="step_time_s"):
        train_throughput(step_time_s=0.0, per_device_batch=1, world_size=1, seq_length=8, hf_config=cfg,
                         gradient_checkpointing=False, lora_dim=0)


def test_cpu_memory_is_process_rss():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    now, peak = current_memory_gb(cpu), peak_memory_gb(cpu)
    # A Python process with torch loaded holds well over 10 MiB and far less than 1 TiB.
    assert 0.01 < now < 1024
    assert peak >= now * 0.99  # the kernel's peak is at least the current RSS (sampled just before)
    assert peak_memory_gb(None) == pytest.approx(peak, rel=0.1)


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_cpu_peak_resets_per_window():
    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    del block
    high = peak_memory_gb(cpu)
    reset_peak_memory(cpu)
    low = peak_memory_gb(cpu)
    assert high - low > 0.05  # the 64 MiB block raised the first window only


def test_step_timer_measures_sleep():
    timer = StepTimer(torch.device("cpu"))
    timer.start()
    time.sleep(0.02)
    elapsed = timer.stop()
    assert 0.02 <= elapsed < 0.5
    with pytest.raises(RuntimeError, match="before start"):
        timer.stop()


def test_step_timer_phases_add_up_and_keep_their_peak():
    cpu = torch.device("cpu")
    timer = StepTimer(cpu, phases=("generate", "train", "idle"))
    for _ in range(2):
        with timer.phase("generate"):
            time.sleep(0.01)
    with timer.phase("train"):
        block = torch.ones(16 * 2**20 // 4)  # 16 MiB, touched
        block += 1
    assert 0.02 <= timer.seconds["generate"] < 0.5
    assert timer.seconds["idle"] == 0.0 and set(timer.seconds) == {"generate", "train", "idle"}
    assert set(timer.peaks) == {"generate", "train"} and timer.peaks["train"] > 0
    with pytest.raises(ValueError), timer.phase("train"):  # a failing phase still counts its time
        raise ValueError
    assert timer.seconds["train"] > 0
