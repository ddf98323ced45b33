"""Model-state bytes per rank: hand-worked cases, and DeepSpeed's own ZeRO-2/ZeRO-3 estimators."""
from __future__ import annotations

import pytest
from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs
from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs

from engine.planner.model_states import Bytes, frozen_role, trained_role

P, L = 1_000_000_000, 100_000_000  # a 1B model whose largest module holds 100M parameters
DS_BUFFER = 1.5                   # DeepSpeed's additional_buffer_factor on host memory


def total(states: dict[str, Bytes]) -> Bytes:
    return sum(states.values(), Bytes())


@pytest.mark.parametrize("n", [1, 2, 4])
def test_zero2_equals_deepspeeds_estimator(n):
    for offload in (False, True):
        ds_cpu, ds_gpu = estimate_zero2_model_states_mem_needs(P, num_gpus_per_node=n, cpu_offload=offload)
        ours = total(trained_role(P, P, L, dtype="bf16", zero_stage=2, world_size=n, offload=offload))
        assert ours.gpu == ds_gpu
        if offload:  # DeepSpeed gives the node's host memory: every rank's share, times its buffer factor
            assert ours.cpu * n * DS_BUFFER == ds_cpu


@pytest.mark.parametrize("n", [1, 2, 8])
def test_zero3_equals_deepspeeds_estimator_but_counts_the_16bit_gradient_partition(n):
    cases = [(True, True), (True, False), (False, False)]  # (offload optimizer, offload parameters)
    for offload, offload_params in cases:
        ds_cpu, ds_gpu, _ = estimate_zero3_model_states_mem_needs(P, L, num_gpus_per_node=n, cpu_offload=offload,
                                                                  cpu_offload_params=offload_params)
        ours = total(trained_role(P, P, L, dtype="bf16", zero_stage=3, world_size=n, offload=offload,
                                  offload_params=offload_params))
        if offload:
            assert ours.gpu == ds_gpu and ours.cpu * n * DS_BUFFER == pytest.approx(ds_cpu)
        else:
            assert ours.gpu == ds_gpu + 2 * P / n


def test_hand_worked_full_and_lora_training():
    # bf16, ZeRO-0, 100 params all trained: params 2·100, grads 2·100 + fp32 4·100, Adam 8·100 + master 4·100.
    s = trained_role(100, 100, 10, dtype="bf16", zero_stage=0, world_size=4)
    assert (s["parameters"].gpu, s["gradients"].gpu, s["optimizer"].gpu) == (200, 600, 1200)
    # fp32 without ZeRO: plain AdamW, no master copy: 4 + 4 + 8 = 16 bytes per parameter.
    assert total(trained_role(100, 100, 10, dtype="fp32", zero_stage=0, world_size=1)).gpu == 1600
    # LoRA only: 1000 params (base + adapters), 10 trained, ZeRO-1 on 2 ranks: optimizer and fp32 grads halve.
    s = trained_role(1000, 10, 10, dtype="bf16", zero_stage=1, world_size=2)
    assert (s["parameters"].gpu, s["gradients"].gpu, s["optimizer"].gpu) == (2000, 20 + 20, 60)


def test_frozen_roles_partitioned_and_quantized():
    # 1000 params, 800 of them in decoder Linear weights with 40 output rows in all, largest module 100.
    args = dict(params=1000, linear_params=800, linear_rows=40, largest_layer=100, dtype="bf16", world_size=4)
    assert frozen_role(**args, zero_stage=0)["parameters"] == Bytes(gpu=2000)
    assert frozen_role(**args, zero_stage=3)["parameters"] == Bytes(gpu=2000 / 4 + 200)
    assert frozen_role(**args, zero_stage=3, offload_params=True)["parameters"] == Bytes(gpu=200, cpu=500)
    # 8-bit: 1 byte per weight + a 4-byte scale per row; the other 200 params stay bf16.
    assert frozen_role(**args, zero_stage=0, quantization="8bit")["parameters"].gpu == 800 + 160 + 400
    # 4-bit NF4: half a byte per weight + a 4-byte absmax per block of 64.
    assert frozen_role(**args, zero_stage=0, quantization="4bit")["parameters"].gpu == 400 + 50 + 400


def test_offload_needs_the_zero_stage_that_supports_it():
    with pytest.raises(ValueError, match="offload needs ZeRO-2"):
        trained_role(10, 10, 1, dtype="bf16", zero_stage=1, world_size=1, offload=True)
    with pytest.raises(ValueError):
        trained_role(10, 10, 1, dtype="bf16", zero_stage=2, world_size=1, offload=True, offload_params=True)
    with pytest.raises(ValueError, match="quantization"):
        frozen_role(10, 8, 1, 1, dtype="bf16", zero_stage=0, world_size=1, quantization="2bit")


@pytest.mark.parametrize("quantization", ["none", "8bit", "4bit"])
def test_frozen_bytes_match_a_bitsandbytes_model_on_cpu(engine_cache, quantization):
    """The built-in model loaded as bitsandbytes loads it: the prediction is the weights' bytes plus the
    scales bitsandbytes keeps beside them (not parameters). Measured: exact, +2.2% and +3.3%."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from engine.planner.shapes import load_config, model_shape_of
    from tests.conftest import tiny_model_folder

    folder = tiny_model_folder(engine_cache)
    shape = model_shape_of(load_config(str(folder)))
    linear = sum(i * o for i, o in shape.lora_targets)
    rows = sum(o for _, o in shape.lora_targets)
    predicted = frozen_role(shape.params, linear, rows, shape.largest_layer_params, dtype="fp32", zero_stage=0,
                            world_size=1, quantization=quantization)["parameters"].gpu
    config = {"8bit": BitsAndBytesConfig(load_in_8bit=True),
              "4bit": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                         bnb_4bit_compute_dtype=torch.float32)}.get(quantization)
    kwargs = {"quantization_config": config, "device_map": "cpu"} if config else {}
    model = AutoModelForCausalLM.from_pretrained(folder, **kwargs)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    assert weights <= predicted <= 1.05 * weights
    if quantization != "none":
        assert predicted < 0.5 * shape.params * 4  # well under the fp32 model
