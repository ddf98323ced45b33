"""MixZ++ (--enable_mixed_precision_lora) with the hybrid generation mode, on CPU ranks: the frozen base weights
of a LoRA actor stored quantized by ZeRO-3, then generated from in the hybrid mode, which folds LoRA into the
gathered weights.

    deepspeed --num_gpus 2 tests/helpers/mixz_probe.py --out report.json

DeepSpeed's quantizer for these weights is a CUDA kernel (`CUDAQuantizer`), so this probe puts a torch one in
its place (symmetric int8 in groups, the kernel's format: int8 values and one scale per group) and leaves every
other part to DeepSpeed's own code: quantizing the frozen base after the engine is built, as step 3 does, the
all-gather and dequantization, the release. (Weights already frozen when ZeRO-3 first partitions them take another
path, which in DeepSpeed 0.19.8 quantizes the empty buffer before the values are copied in; step 3 never takes
it, as it partitions the model before LoRA freezes the base.) It checks what a GPU run relies on:
- the frozen weights are stored quantized (int8 partitions, by `quantize_nontrainable_params`, which wants fp16
  and weights of more than 500k elements: a 1-layer model of width 1024 in fp16);
- after a hybrid generation the stored partitions are byte for byte what they were (LoRA, folded into the
  gathered copies, never reaches the stored weights), and a second hybrid generation gives the same tokens;
- the hybrid mode's greedy tokens equal plain ZeRO-3 generation's (hooks fetch each layer, LoRA applied in each
  layer's forward) on the same quantized weights, and LoRA changes them (so that both checks can fail).
Writes the findings as JSON (rank 0); tests/distributed/test_hybrid_generation.py asserts on them.
"""
from __future__ import annotations

import argparse
import json
import math

import torch
import torch.distributed as tdist

from engine.config import DeepSpeedArgs, LoRAArgs, TrainArgs
from engine.models.lora import apply_lora, optimizer_param_groups
from engine.models.tiny import TINY_LLAMA, VOCAB_SIZE
from engine.ppo.trainer import generate_sequences
from engine.runtime.distributed import init_distributed
from engine.runtime.ds_private import quantize_nontrainable_params
from engine.runtime.engines import build_ds_config, deepspeed_initialize, make_optimizer


class TorchQuantizer:
    """DeepSpeed's `CUDAQuantizer` interface in torch: `quantize(t)` -> (int8 values, fp32 scale per group),
    `dequantize(q, scale, dtype)`; symmetric 8-bit, groups of equal size (so that the all-gathered values of all
    ranks dequantize with the all-gathered scales, as the kernel's do)."""

    group_size = 64

    def quantize(self, tensor: torch.Tensor, groups: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        flat = tensor.detach().float().reshape(-1)
        groups = groups or max(1, math.ceil(flat.numel() / self.group_size))
        assert flat.numel() % groups == 0, (flat.numel(), groups)
        rows = flat.view(groups, -1)
        scale = rows.abs().amax(dim=1).clamp_min(1e-12) / 127.0
        values = torch.round(rows / scale[:, None]).clamp(-127, 127).to(torch.int8).view(-1)
        return values, scale

    def dequantize(self, values: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        rows = values.float().reshape(scale.numel(), -1) * scale.float()[:, None]
        return rows.view(values.shape).to(dtype or torch.float16)  # the shape it was given, as the kernel


def install_quantizer() -> None:
    from deepspeed.runtime.zero import partition_parameters, stage3

    partition_parameters.CUDAQuantizer = TorchQuantizer  # gathers dequantize with it
    stage3.CUDAQuantizer = TorchQuantizer  # quantize_nontrainable_params quantizes with it


def build_actor(dist) -> tuple:
    import deepspeed
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    # DeepSpeed quantizes only weights of more than 500k elements: a wider layer than the tiny model's.
    model = LlamaForCausalLM(LlamaConfig(**dict(TINY_LLAMA, vocab_size=VOCAB_SIZE, hidden_size=1024,
                                                intermediate_size=1024, num_hidden_layers=1, num_attention_heads=8,
                                                num_key_value_heads=8)))
    with torch.no_grad():  # large enough that greedy tokens vary (transformers' 0.02 init repeats one token)
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.3)
    ds_config = build_ds_config(DeepSpeedArgs(zero_stage=3, dtype="fp16"), TrainArgs(per_device_train_batch_size=2),
                                dist.world_size)
    # MixZ++'s switch, as engine.models.roles.actor_ds_config sets it on a GPU; nothing stays resident.
    ds_config["zero_optimization"].update(zero_quantized_nontrainable_weights=True, stage3_max_reuse_distance=0,
                                          stage3_param_persistence_threshold=0, stage3_max_live_parameters=0,
                                          stage3_prefetch_bucket_size=0)
    # As step 3 builds the actor: partitioned while every weight trains (load_causal_lm loads under zero.Init),
    # then LoRA, the engine, and the frozen base quantized (engine.models.roles.build_roles).
    deepspeed.zero.Init(module=model.half(), config_dict_or_path=ds_config)
    model = apply_lora(model, LoRAArgs(lora_dim=8, only_optimize_lora=True))
    with torch.no_grad():  # peft starts lora_B at zero: LoRA would change nothing, and a lost fold go unseen
        for name, p in model.named_parameters():
            if "lora_B" in name:
                with deepspeed.zero.GatheredParameters([p], modifier_rank=0):
                    p.normal_(0.0, 0.3)
    optimizer = make_optimizer(optimizer_param_groups(model, 0.0, 1e-2), 1e-2, (0.9, 0.95), False)
    engine = deepspeed_initialize(model, optimizer, None, ds_config)
    quantize_nontrainable_params(engine)
    return engine, model


def quantized_partitions(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: torch.cat([p.ds_tensor.view(-1).view(torch.uint8), p.ds_tensor.ds_quant_scale.view(torch.uint8)])
            for name, p in model.named_parameters() if hasattr(p.ds_tensor, "ds_quant_scale")}


def all_ranks(flag: bool) -> bool:
    value = torch.tensor([float(flag)])
    tdist.all_reduce(value, op=tdist.ReduceOp.MIN)
    return bool(value.item())


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--out", required=True)
    p.add_argument("--local_rank", type=int, default=-1)
    args = p.parse_args()
    dist = init_distributed(1234)
    install_quantizer()
    engine, model = build_actor(dist)
    stored = quantized_partitions(model)
    torch.manual_seed(1)
    prompts = torch.randint(3, VOCAB_SIZE, (2, 12))
    mask = torch.ones_like(prompts)
    gen = dict(max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    with torch.no_grad():  # as step 3 generates (engine.ppo.trainer)
        hybrid = generate_sequences(engine, 3, prompts, mask, gen, hybrid=True)
        unchanged = all(torch.equal(stored[name], now) for name, now in quantized_partitions(model).items())
        again = generate_sequences(engine, 3, prompts, mask, gen, hybrid=True)
        naive = generate_sequences(engine, 3, prompts, mask, gen, hybrid=False)
        with model.disable_adapter():
            base_only = generate_sequences(engine, 3, prompts, mask, gen, hybrid=False)
    report = {
        "quantized_weights": len(stored),
        "frozen_weights": sum(1 for p in model.parameters() if not p.requires_grad),
        "lora_weights": sum(1 for name, _ in model.named_parameters() if "lora_" in name),
        "partitions_unchanged": all_ranks(unchanged),
        "hybrid_repeatable": all_ranks(torch.equal(hybrid, again)),
        "hybrid_equals_naive": all_ranks(torch.equal(hybrid, naive)),
        "lora_changes_tokens": not all_ranks(torch.equal(naive, base_only)),
        "generated_tokens": int(hybrid.shape[1] - prompts.shape[1]),
    }
    if dist.rank == 0:
        with open(args.out, "w") as f:
            json.dump(report, f, indent=2)
        print(json.dumps(report))


if __name__ == "__main__":
    main()
