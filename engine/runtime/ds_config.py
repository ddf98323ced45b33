"""DeepSpeed configs from pure builder functions, and "auto" templates filled from the flags.

`train_ds_config` mirrors DeepSpeed-Chat's `get_train_ds_config` (same ZeRO knobs, fp16 loss-scale
window, clipping) with every value an argument; `eval_ds_config` is for frozen roles. The JSON files
in `ds_configs/` are templates: `fill_template` replaces their "auto" values with the builder's; a
test checks each template against the builder so the two never drift.
"""
from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

from engine.errors import UserError

AUTO = "auto"
DEEPSPEED_REDUCE_BUCKET = 500_000_000  # DeepSpeed's default reduce_bucket_size, in elements
STAGE3_BUCKET = 30_000_000  # DeepSpeed-Chat's ZeRO-3 live-parameter and prefetch buckets, in elements
DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}  # bytes per parameter of --dtype

# Keys whose value the engine also uses outside DeepSpeed (data loaders, model dtype, ZeRO-3 model
# construction): an explicit value in a user's template must agree with the flags.
MUST_AGREE = (
    ("zero_optimization", "stage"),
    ("zero_optimization", "offload_param", "device"),
    ("zero_optimization", "offload_optimizer", "device"),
    ("train_micro_batch_size_per_gpu",),
    ("gradient_accumulation_steps",),
    ("train_batch_size",),
    ("fp16", "enabled"),
    ("bf16", "enabled"),
)


def frozen_zero_stage(trained_stage: int, quantization: str = "none") -> int:
    """A frozen role's ZeRO stage: 3 iff the trained role it follows (reference and EMA: the actor; reward:
    the critic) is ZeRO-3, so the two gather alike; else 0, whole on every rank. A quantized role is whole
    on every rank too: ZeRO cannot partition bitsandbytes weights."""
    return 3 if trained_stage == 3 and quantization == "none" else 0


def _dtype_sections(dtype: str) -> dict[str, Any]:
    if dtype not in ("fp16", "bf16", "fp32"):
        raise ValueError(f"unknown dtype {dtype!r}")
    return {
        "fp16": {"enabled": dtype == "fp16", "loss_scale_window": 100},
        "bf16": {"enabled": dtype == "bf16"},
    }


def train_ds_config(*, zero_stage: int, offload: bool, dtype: str, micro_batch_size: int,
                    gradient_accumulation_steps: int, world_size: int, gradient_clipping: float = 1.0,
                    tensorboard_path: str = "", tensorboard_job: str = "") -> dict[str, Any]:
    """The DeepSpeed config of a trained model (actor, critic, SFT or reward model).

    `train_batch_size` is derived here and only here: micro batch x accumulation x world size.
    Parameter offload is ZeRO-3 only; optimizer offload needs ZeRO >= 2 (the config validates that).
    """
    device = "cpu" if offload else "none"
    return {
        "train_batch_size": micro_batch_size * gradient_accumulation_steps * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": gradient_accumulation_steps,
        "steps_per_print": 1_000_000_000,  # the engine logs; DeepSpeed's own prints stay quiet
        "zero_optimization": {
            "stage": zero_stage,
            "overlap_comm": True,
            "offload_param": {"device": device if zero_stage == 3 else "none"},
            "offload_optimizer": {"device": device},
            # DeepSpeed-Chat's values: small params stay resident, 3e7-element live/prefetch buckets.
            "stage3_param_persistence_threshold": 10_000,
            "stage3_max_live_parameters": STAGE3_BUCKET,
            "stage3_prefetch_bucket_size": STAGE3_BUCKET,
            "memory_efficient_linear": False,
        },
        **_dtype_sections(dtype),
        "gradient_clipping": gradient_clipping,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
        "tensorboard": {"enabled": bool(tensorboard_path), "output_path": tensorboard_path,
                        "job_name": tensorboard_job},
    }


def eval_ds_config(*, zero_stage: int, offload: bool, dtype: str, micro_batch_size: int = 1,
                   world_size: int = 1) -> dict[str, Any]:
    """The DeepSpeed config of a frozen role (reference, reward): no optimizer, optional param offload."""
    return {
        "train_batch_size": micro_batch_size * world_size,
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "steps_per_print": 1_000_000_000,
        "zero_optimization": {
            "stage": zero_stage,
            "offload_param": {"device": "cpu" if offload and zero_stage == 3 else "none"},
            "stage3_param_persistence_threshold": 10_000,
            "memory_efficient_linear": False,
        },
        **_dtype_sections(dtype),
        "gradient_clipping": 1.0,
        "prescale_gradients": False,
        "wall_clock_breakdown": False,
    }


def _get(d: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        if not isinstance(d, dict) or key not in d:
            return None
        d = d[key]
    return d


def fill_template(template: dict[str, Any], built: dict[str, Any], source: str = "template") -> dict[str, Any]:
    """Replace every "auto" in `template` with the builder's value at the same place.

    Explicit values are kept, except that those in MUST_AGREE must equal the builder's (else
    UserError naming the key and the flag to change); keys the template lacks take the builder's.
    """
    for path in MUST_AGREE:
        mine, theirs = _get(template, path), _get(built, path)
        if mine is not None and mine != AUTO and mine != theirs:
            key = ".".join(path)
            raise UserError(f"{source}: {key} = {mine!r} contradicts the flags ({theirs!r}); set it "
                            f"to \"auto\" or pass the matching flag")

    def fill(node: Any, base: Any, path: tuple[str, ...]) -> Any:
        if isinstance(node, dict):
            # Keys the template leaves out take the builder's value, so a short template still
            # agrees with the flags on everything in MUST_AGREE.
            merged = copy.deepcopy(base) if isinstance(base, dict) else {}
            merged.update({k: fill(v, _get(built, path + (k,)), path + (k,)) for k, v in node.items()})
            return merged
        if node == AUTO:
            if base is None:
                raise UserError(f"{source}: no flag gives a value for \"auto\" at {'.'.join(path)}; "
                                "write an explicit value")
            return copy.deepcopy(base)
        return node

    return fill(template, built, ())


def load_template(path: str) -> dict[str, Any]:
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise UserError(f"--deepspeed_config {path}: cannot read it as JSON ({err}); fix the file (see ds_configs/ "
                        "for examples)") from None
    if not isinstance(data, dict):
        raise UserError(f"--deepspeed_config {path}: the top level must be a JSON object; see ds_configs/ for examples")
    return data


def reduce_bucket_elements(trained_params: int) -> int:
    """The gradient-reduction bucket `size_reduce_bucket` gives a role training `trained_params`."""
    return int(min(DEEPSPEED_REDUCE_BUCKET, max(trained_params, 1_000_000)))


def size_reduce_bucket(ds_config: dict[str, Any], trained_params: int) -> dict[str, Any]:
    """`ds_config` with ZeRO's gradient-reduction bucket no larger than the trained parameters.

    ZeRO-1/2/3 allocate their reduction buffers at reduce_bucket_size elements whatever the model
    (default 5e8: 0.93 GiB in bf16 under ZeRO-3; two buffers with overlap_comm under ZeRO-1/2, fp32 under
    ZeRO-1), so a LoRA run that trains a few million parameters would hold GiBs of empty buffer per
    trained role. A size the config sets is kept."""
    zero = ds_config.get("zero_optimization", {})
    if zero.get("stage", 0) == 0 or "reduce_bucket_size" in zero:
        return ds_config
    sized = copy.deepcopy(ds_config)
    sized["zero_optimization"]["reduce_bucket_size"] = reduce_bucket_elements(trained_params)
    return sized
