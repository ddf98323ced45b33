"""Bytes of model states per rank: parameters, gradients and optimizer states of a role, on the
accelerator and in host memory, for each ZeRO stage, offload choice, dtype and quantization.

Pure arithmetic on parameter counts (`engine.planner.shapes` gives them). The accounting follows what
DeepSpeed keeps and, where DeepSpeed has estimators (`estimate_zero2_model_states_mem_needs`,
`estimate_zero3_model_states_mem_needs`), equals them without their 1.5 host buffer factor, with one
difference: under ZeRO-3 without offload we also count the 16-bit gradient partition (2·T/N) that
ZeRO-3 holds from backward to step and DeepSpeed's estimator leaves out. A test checks both. With P
parameters, T of them trained, N ranks, b bytes per parameter of the model dtype and L the largest
module's parameters:

- parameters: b·P on every rank; ZeRO-3 keeps b·P/N plus the gathered largest module (b·L).
- gradients: the b-byte gradients of T (b·T; ZeRO-2/3: b·T/N, plus b·L gathered under ZeRO-3) and,
  with 16-bit training, the fp32 gradient partition the optimizer steps on (4·T, or 4·T/N from ZeRO-1);
  offload moves the fp32 partition to the host and drops the partitioned 16-bit gradients there too.
- optimizer: Adam's two moments (8·T) and, unless the model already trains in fp32 without ZeRO, an
  fp32 master copy (4·T); partitioned from ZeRO-1, on the host with offload.
A frozen role has parameters only; 8-bit or 4-bit quantization (bitsandbytes) stores the Linear
weights of its decoder in 1 or 0.5 bytes plus their scales (4 bytes per row for 8-bit, 4 bytes per
block of 64 for 4-bit NF4) and keeps the rest (embeddings, norms, biases, heads) in the model dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.runtime.ds_config import DTYPE_BYTES

NF4_BLOCK = 64  # bitsandbytes' 4-bit block size: one fp32 absmax per block


@dataclass(frozen=True)
class Bytes:
    """Bytes per rank on the accelerator (`gpu`) and in host memory (`cpu`)."""

    gpu: float = 0.0
    cpu: float = 0.0

    def __add__(self, other: Bytes) -> Bytes:
        return Bytes(self.gpu + other.gpu, self.cpu + other.cpu)


def trained_role(params: int, trainable: int, largest_layer: int, *, dtype: str, zero_stage: int, world_size: int,
                 offload: bool = False, offload_params: bool = False) -> dict[str, Bytes]:
    """{"parameters", "gradients", "optimizer"} bytes per rank of a role trained with Adam.

    params: every parameter of the role (with LoRA: base + adapters); trainable: those with gradients
    (all of them, or the adapters (+ a value head) with --only_optimize_lora). offload: the optimizer
    (ZeRO-2/3), offload_params: the parameters too (ZeRO-3)."""
    if offload and zero_stage < 2 or offload_params and zero_stage != 3:
        raise ValueError("offload needs ZeRO-2 or 3 and parameter offload ZeRO-3")
    b, n = DTYPE_BYTES[dtype], world_size
    half = b == 2
    if zero_stage == 3:
        on_rank = b * params / n
        gathered = b * largest_layer
        parameters = Bytes(cpu=on_rank, gpu=gathered) if offload_params else Bytes(gpu=on_rank + gathered)
    else:
        parameters = Bytes(gpu=b * params)

    grads_b = b * trainable / (n if zero_stage >= 2 else 1)   # gradients in the model dtype
    grads_32 = (4 * trainable / (n if zero_stage >= 1 else 1)) if half else 0.0  # the fp32 partition
    working = b * largest_layer if zero_stage == 3 else 0.0
    if offload:
        gradients = Bytes(gpu=working + (0.0 if zero_stage >= 2 else grads_b), cpu=grads_32 or 4 * trainable / n)
    else:
        gradients = Bytes(gpu=working + grads_b + grads_32)

    master = 0 if (not half and zero_stage == 0) else 4 * trainable
    states = (8 * trainable + master) / (n if zero_stage >= 1 else 1)
    optimizer = Bytes(cpu=states) if offload else Bytes(gpu=states)
    return {"parameters": parameters, "gradients": gradients, "optimizer": optimizer}


def frozen_role(params: int, linear_params: int, linear_rows: int, largest_layer: int, *, dtype: str,
                zero_stage: int, world_size: int, offload_params: bool = False,
                quantization: str = "none") -> dict[str, Bytes]:
    """{"parameters"} bytes per rank of a frozen role (reference, reward model, EMA).

    linear_params / linear_rows: weights and output rows of the decoder's Linear layers (what
    bitsandbytes quantizes). Quantized roles are not partitioned (ZeRO cannot shard bitsandbytes
    weights), so zero_stage and offload only apply to `quantization="none"`."""
    b = DTYPE_BYTES[dtype]
    if quantization == "none":
        if zero_stage == 3:
            on_rank = b * params / world_size
            if offload_params:
                return {"parameters": Bytes(gpu=b * largest_layer, cpu=on_rank)}
            return {"parameters": Bytes(gpu=on_rank + b * largest_layer)}
        return {"parameters": Bytes(gpu=b * params)}
    if quantization == "8bit":
        quantized = linear_params * 1 + 4 * linear_rows
    elif quantization == "4bit":
        quantized = linear_params * 0.5 + 4 * linear_params / NF4_BLOCK
    else:
        raise ValueError(f"quantization must be none, 8bit or 4bit, not {quantization!r}")
    return {"parameters": Bytes(gpu=quantized + b * (params - linear_params))}
