"""The hybrid train/generate mode: generate with the actor the way an inference engine would.

Under plain ZeRO-3, `generate` fetches every layer's shards for every new token (hooks on each
module), and every rank must keep stepping until all ranks finish (`synced_gpus`). The hybrid mode
instead gathers the shards once per generation batch, binds the gathered tensors into a hook-free
replica of the model (built on the meta device, so no weights are copied), folds LoRA into the base
weights, and generates with a KV cache, each rank on its own. On exit the gathered tensors are
released (ZeRO-3 re-partitions them) and the module is back in training mode, unchanged.

It works for any Hugging Face causal LM and on CPU: it relies on transformers' own `generate`, not on
DeepSpeed-Inference kernels (DeepSpeed's hybrid engine knows a fixed list of families and needs CUDA).
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

from engine.models.load import copy_missing_buffers, hf_model, is_quantized, meta_skeleton
from engine.runtime.ds_private import gathered_scratch, persistent


def _fused_tensors(inner: torch.nn.Module, may_modify: bool) -> dict[str, torch.Tensor]:
    """name -> tensor for a plain (LoRA-free) copy of `inner`, with every LoRA layer folded in.

    `may_modify`: the gathered base weights are throw-away buffers, so LoRA is added in place; else
    (weights that are the training parameters themselves) the fused weight is a new tensor.
    """
    tensors: dict[str, torch.Tensor] = {}
    lora_layers = {name: m for name, m in inner.named_modules() if hasattr(m, "get_delta_weight")}
    for name, p in inner.named_parameters():
        tensors[name] = p.data
    for name, layer in lora_layers.items():
        base = layer.get_base_layer().weight
        delta = sum(layer.get_delta_weight(a) for a in layer.active_adapters).to(base.dtype)
        in_place = may_modify and not persistent(base)  # persistent params stay resident
        tensors[f"{name}.weight"] = base.data.add_(delta) if in_place else base.data + delta
        tensors.pop(f"{name}.base_layer.weight")
        if f"{name}.base_layer.bias" in tensors:
            tensors[f"{name}.bias"] = tensors.pop(f"{name}.base_layer.bias")
        for key in [k for k in tensors if k.startswith(f"{name}.lora_")]:
            tensors.pop(key)
    return tensors


def hook_free_replica(module: torch.nn.Module, may_modify: bool) -> torch.nn.Module:
    """A plain Hugging Face model bound to `module`'s (gathered) weights, LoRA fused, eval mode."""
    inner = hf_model(module)
    replica = meta_skeleton(inner)
    replica.load_state_dict(_fused_tensors(inner, may_modify), strict=False, assign=True)
    copy_missing_buffers(replica, inner)
    replica.tie_weights()
    replica.config.use_cache = True
    return replica.eval().requires_grad_(False)


@contextlib.contextmanager
def _kv_cache(module: torch.nn.Module) -> Iterator[None]:
    """Turn the KV cache on inside the block (training models are built with use_cache off)."""
    config = hf_model(module).config
    was = config.use_cache
    config.use_cache = True
    try:
        yield
    finally:
        config.use_cache = was


@contextlib.contextmanager
def generation_mode(engine: Any, zero_stage: int) -> Iterator[torch.nn.Module]:
    """`with generation_mode(actor_engine, stage) as model: model.generate(...)`.

    Yields a hook-free replica (ZeRO-3: gathered once for the whole block), or the module itself when its
    base is quantized. Restores the training mode on exit, whatever happens inside.
    """
    module = engine.module
    was_training = module.training
    module.eval()
    try:
        with torch.no_grad():
            if is_quantized(module):
                # A 4-bit actor (ZeRO 0-2): LoRA cannot be folded into bitsandbytes weights without a
                # full-precision copy of the base, the memory QLoRA saves; it generates as it is, with a KV cache.
                with _kv_cache(module):
                    yield module
            elif zero_stage == 3:
                with gathered_scratch(list(module.parameters())):
                    yield hook_free_replica(module, may_modify=True)
            else:
                yield hook_free_replica(module, may_modify=False)
    finally:
        module.train(was_training)
