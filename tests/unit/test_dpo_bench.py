"""The DPO memory benchmark's measuring tools (benchmarks/dpo_memory.py): the census of live weights and its
interim DPO loss, by hand."""
from __future__ import annotations

import importlib.util
from pathlib import Path

import torch

from engine.bench.live_weights import count_weights, live_modules

ROOT = Path(__file__).resolve().parents[2]


def bench_module():
    spec = importlib.util.spec_from_file_location("dpo_memory", ROOT / "benchmarks" / "dpo_memory.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_second_model_is_counted_and_wrapping_or_sharing_is_not():
    policy = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.LayerNorm(4))  # 16 + 4 + 4 + 4 floats
    reference = torch.nn.Linear(8, 2)  # 16 + 2 floats
    alone = count_weights(policy, list(policy.modules()))
    assert alone == {"live_module_bytes": 28 * 4, "policy_bytes": 28 * 4, "non_policy_bytes": 0,
                     "models_with_weights": 1}
    both = count_weights(policy, [*policy.modules(), reference])
    assert (both["non_policy_bytes"], both["models_with_weights"]) == (18 * 4, 2)
    wrapper = torch.nn.Sequential(policy)  # the policy inside another module, as peft wraps it
    alias = torch.nn.Linear(4, 4)
    alias.weight, alias.bias = policy[0].weight, policy[0].bias  # the policy's storages: no new bytes
    shared = count_weights(wrapper, [wrapper, *policy.modules()])
    assert shared == alone | {"models_with_weights": 1}
    assert count_weights(wrapper, [wrapper, *policy.modules(), alias])["non_policy_bytes"] == 0


def test_a_lora_policy_is_one_model_though_its_layers_hold_their_sub_modules_as_attributes():
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.config import LoRAArgs
    from engine.models.lora import apply_lora

    config = LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                         num_key_value_heads=2, vocab_size=32)
    policy = apply_lora(LlamaForCausalLM(config), LoRAArgs(lora_dim=4))
    layer = policy.base_model.model.model.layers[0].self_attn.q_proj
    detached = [layer.base_layer, layer.lora_A, layer.lora_B]  # out of the module tree (one-module LoRA layers)
    assert not any(m is d for m in policy.modules() for d in detached)
    census = count_weights(policy, [*policy.modules(), *detached])
    assert (census["models_with_weights"], census["non_policy_bytes"]) == (1, 0)


def test_the_census_sees_every_live_module():
    reference = torch.nn.Linear(8, 2)
    assert any(m is reference for m in live_modules(collect=False))  # no collection: a second less

