"""Every use of DeepSpeed's private API: attributes and behaviour DeepSpeed does not document or promise.

Each function names the DeepSpeed version it was verified on. tests/unit/test_ds_private.py checks each
against the installed DeepSpeed (a real 1-rank ZeRO engine on CPU where one can show it, else the names
on DeepSpeed's own classes), so an upgrade that renames or changes one fails a test, not a run.
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from engine.observe import startup
from engine.runtime import startup_guard

VERIFIED_ON = "0.19.8"  # the DeepSpeed version every function below was checked on


# ----------------------------------------------------------------------------------------------
# ZeRO-3 parameter attributes
# ----------------------------------------------------------------------------------------------
def full_numel(p: torch.Tensor) -> int:
    """Elements of the whole parameter: a ZeRO-3 parameter's `ds_numel` (its `numel()` is 0 while
    partitioned), else `numel()`. Verified on DeepSpeed 0.19.8."""
    return getattr(p, "ds_numel", p.numel())


def full_shape(p: torch.Tensor) -> torch.Size:
    """Shape of the whole parameter: a ZeRO-3 parameter's `ds_shape`, else `shape`. Verified on 0.19.8."""
    return getattr(p, "ds_shape", p.shape)


def partition(p: torch.Tensor) -> torch.Tensor | None:
    """This rank's ZeRO-3 partition of the parameter (`ds_tensor`), None for a plain parameter.
    Verified on DeepSpeed 0.19.8."""
    return getattr(p, "ds_tensor", None)


def persistent(p: torch.Tensor) -> bool:
    """Whether ZeRO-3 keeps the whole parameter resident on every rank (`ds_persist`: parameters under
    stage3_param_persistence_threshold are never partitioned). Verified on DeepSpeed 0.19.8."""
    return bool(getattr(p, "ds_persist", False))


def resident(p: torch.Tensor) -> bool:
    """Whether a ZeRO-3 parameter is `persistent` and whole on this rank now (`ds_status` AVAILABLE: ZeRO-3
    gathers persistent parameters at their first use and after every optimizer step, and keeps them).
    Verified on DeepSpeed 0.19.8."""
    if not persistent(p):
        return False
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    return p.ds_status == ZeroParamStatus.AVAILABLE


@contextlib.contextmanager
def gathered_scratch(params: Sequence[torch.Tensor]) -> Iterator[None]:
    """Gather ZeRO-3 parameters for reading; the gathered tensors of non-`persistent` parameters are
    scratch: `modifier_rank=None` makes DeepSpeed re-partition from the unchanged shards on exit, so an
    in-place change (the hybrid mode folds LoRA into them) is dropped. A persistent parameter's tensor
    is the parameter itself: never change it in place.

    `resident` parameters are left out: they are whole already, and DeepSpeed's exit would release them
    (its re-partition does not spare persistent parameters), so that the next forward would fetch each again,
    one collective per module without a prefetch (measured on 2 CPU ranks with LoRA: 14 more collectives per
    experience pass, one per adapted Linear). Verified on DeepSpeed 0.19.8."""
    import deepspeed

    with deepspeed.zero.GatheredParameters([p for p in params if not resident(p)], modifier_rank=None):
        yield


# ----------------------------------------------------------------------------------------------
# ZeRO optimizer internals
# ----------------------------------------------------------------------------------------------
def loss_scale(engine: Any) -> float:
    """The dynamic fp16 loss scale of a trained engine (`engine.optimizer.loss_scale`, a property of
    DeepSpeed's fp16 and ZeRO optimizers). Verified on DeepSpeed 0.19.8."""
    return float(engine.optimizer.loss_scale)


def inner_optimizer(engine: Any) -> torch.optim.Optimizer | None:
    """The torch optimizer a ZeRO optimizer wraps (`engine.optimizer.optimizer`; it steps on the fp32
    partitions), or None. Verified on DeepSpeed 0.19.8."""
    inner = getattr(getattr(engine, "optimizer", None), "optimizer", None)
    return inner if isinstance(inner, torch.optim.Optimizer) else None


def quantize_nontrainable_params(engine: Any) -> None:
    """MixZ++ (--enable_mixed_precision_lora): quantize the frozen weights of a ZeRO-3 engine whose config
    has zero_quantized_nontrainable_weights (`DeepSpeedZeroOptimizer_Stage3.quantize_nontrainable_params`).
    Verified on DeepSpeed 0.19.8."""
    engine.optimizer.quantize_nontrainable_params()


def has_overflow(engine: Any) -> bool:
    """Whether the engine's gradients overflowed (inf/NaN) this step, as its ZeRO optimizer's own check
    sees it (`optimizer.has_overflow(partition_gradients)`, over all ranks). Verified on DeepSpeed 0.19.8."""
    optimizer = engine.optimizer
    return bool(optimizer.has_overflow(getattr(optimizer, "partition_gradients", True)))


@contextlib.contextmanager
def skipped_step(engine: Any) -> Iterator[None]:
    """Make the ZeRO optimizer treat the `engine.step()` inside the block as an overflow: no update, the
    loss scale lowered and `skipped_steps` counted, as for a real one. DeepSpeed's `step` asks
    `self.has_overflow` whenever it checks for overflow (fp16, or bf16 with check_grad_overflow), so an
    instance attribute shadows the method. Verified on DeepSpeed 0.19.8."""
    optimizer = engine.optimizer
    own = vars(optimizer).get("has_overflow")
    optimizer.has_overflow = lambda *args, **kwargs: True
    try:
        yield
    finally:
        if own is None:
            del optimizer.has_overflow  # the class's method again
        else:
            optimizer.has_overflow = own


def step_together(actor: Any, critic: Any) -> tuple[bool, bool]:
    """`step()` both engines, skipping both when either overflowed (--align_overflow): DeepSpeed skips an
    overflowed engine's step on its own; the other is made to skip too (`skipped_step`). Returns
    (actor overflowed, critic overflowed). Verified on DeepSpeed 0.19.8."""
    actor_over, critic_over = has_overflow(actor), has_overflow(critic)
    with skipped_step(actor) if critic_over and not actor_over else contextlib.nullcontext():
        actor.step()
    with skipped_step(critic) if actor_over and not critic_over else contextlib.nullcontext():
        critic.step()
    return actor_over, critic_over


def shadow_step(obj: Any, wrap: Callable[[Callable[..., Any]], Callable[..., Any]]) -> Callable[[], None]:
    """Replace `obj.step` (a DeepSpeed engine's, or its `inner_optimizer`'s) by `wrap(obj.step)` as an
    instance attribute; returns the function that undoes it. DeepSpeed's engine and ZeRO optimizers call
    `step` through the attribute, so the wrapper sees every step. Verified on DeepSpeed 0.19.8."""
    own = vars(obj).get("step")
    obj.step = wrap(obj.step)

    def undo() -> None:
        if own is None:
            del obj.step
        else:
            obj.step = own

    return undo


def coalesce_persistent_gather(engine: Any) -> None:
    """Make a ZeRO-3 engine re-gather its persistent parameters in one collective after each optimizer step
    (nothing changes without ZeRO-3 or without persistent parameters).

    After every step, DeepSpeed's `_post_step` rebuilds the persistent parameters (those under
    stage3_param_persistence_threshold, which every rank keeps whole) from their updated partitions with
    `persistent_parameters[0].all_gather(persistent_parameters)`. That call's blocking path issues one
    collective per parameter. LoRA adds two small persistent parameters per adapted Linear, so that is two
    more collectives per layer and step. On gloo a collective costs about 0.7 ms however small it is (measured
    here: 2 CPU ranks, bf16, 731 us for 256 elements, 738 us for 28 times as many), 20 ms a step for the
    28 adapters of the tiny model. The replacement gathers the same parameters with DeepSpeed's own coalesced
    gather (`all_gather_coalesced`, the one its prefetcher uses for a module's parameters: one flat collective
    per dtype, then each parameter copied into its own buffer), so the result is bit for bit the same.
    Other calls (async, one parameter, hpZ secondary partitions) keep DeepSpeed's path. Installed as an
    instance attribute of that one parameter, as DeepSpeed installs the original. Verified on DeepSpeed
    0.19.8."""
    from deepspeed.runtime.zero.partition_parameters import ZeroParamStatus

    params = list(getattr(getattr(engine, "optimizer", None), "persistent_parameters", None) or [])
    if not params or not hasattr(params[0], "all_gather_coalesced"):
        return
    first = params[0]
    original = first.all_gather

    def all_gather(param_list: Sequence[torch.Tensor] | None = None, async_op: bool = False,
                   hierarchy: int = 0) -> Any:
        pending = [p for p in param_list or () if p.ds_status == ZeroParamStatus.NOT_AVAILABLE]
        if (async_op or hierarchy or len(pending) < 2
                or any(getattr(p, "ds_secondary_tensor", None) is not None for p in pending)):
            return original(param_list, async_op=async_op, hierarchy=hierarchy)
        first.all_gather_coalesced(pending).wait()
        return None

    first.all_gather = all_gather


# ----------------------------------------------------------------------------------------------
# Checkpoint loading without unpickling code
# ----------------------------------------------------------------------------------------------
class SafeCheckpointEngine:
    """DeepSpeed's torch checkpoint engine with `torch.load(weights_only=True)`: tensors, containers and
    the allow-listed DeepSpeed types only, so loading a checkpoint cannot run code. Every other attribute
    is the wrapped engine's. Verified on DeepSpeed 0.19.8."""

    def __init__(self, inner: Any):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def load(self, path: str, map_location: Any = None) -> Any:
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return torch.load(path, map_location=map_location, weights_only=True)


@contextlib.contextmanager
def safe_checkpoint_loading(engine: Any) -> Iterator[None]:
    """Inside the block `engine.load_checkpoint` reads through `SafeCheckpointEngine` (DeepSpeed reads every
    checkpoint file through `engine.checkpoint_engine.load`). Verified on DeepSpeed 0.19.8."""
    engine.checkpoint_engine = SafeCheckpointEngine(engine.checkpoint_engine)
    try:
        yield
    finally:
        engine.checkpoint_engine = engine.checkpoint_engine._inner


@contextlib.contextmanager
def safe_torch_load() -> Iterator[None]:
    """Inside the block every `torch.load` reads with `weights_only=True` and the `deepspeed_safe_globals`
    allow-list, whatever its caller asked: DeepSpeed's universal-checkpoint converter (`ds_to_universal`) and
    its universal loaders call `torch.load(..., weights_only=False)` directly, not through the checkpoint
    engine. Verified on DeepSpeed 0.19.8."""
    original = torch.load

    def load(*args: Any, **kwargs: Any) -> Any:
        kwargs["weights_only"] = True
        with torch.serialization.safe_globals(deepspeed_safe_globals()):
            return original(*args, **kwargs)

    torch.load = load
    try:
        yield
    finally:
        torch.load = original


@contextlib.contextmanager
def universal_loading(engine: Any) -> Iterator[None]:
    """Inside the block `engine.load_checkpoint` reads DeepSpeed's universal format (what `"checkpoint":
    {"load_universal": true}` in the config turns on; the engine reads the setting, `_config.
    load_universal_checkpoint`, only when it loads), through `safe_torch_load`. Verified on DeepSpeed 0.19.8."""
    config = engine._config
    before = config.load_universal_checkpoint
    config.load_universal_checkpoint = True
    try:
        with safe_torch_load():
            yield
    finally:
        config.load_universal_checkpoint = before


def deepspeed_safe_globals() -> list[Any]:
    """The non-tensor types DeepSpeed's checkpoints hold (found by loading ZeRO 0-3, offload and LoRA
    checkpoints with weights_only=True): plain data classes and enums, at their private module paths.
    Verified on DeepSpeed 0.19.8."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    return [LossScaler, DynamicLossScaler, ZeroStageEnum, fragment_address]


# ----------------------------------------------------------------------------------------------
# Op builds
# ----------------------------------------------------------------------------------------------
def hook_op_builds(before: Callable[[str], None]) -> None:
    """Call `before(op name)` ahead of every op DeepSpeed compiles or loads from its JIT cache: every op
    builder's `load()` calls `OpBuilder.jit_load` for an op not installed prebuilt, which passes the op's
    `name` to torch.utils.cpp_extension.load as the build folder's name. Idempotent.
    Verified on DeepSpeed 0.19.8."""
    from deepspeed.ops.op_builder.builder import OpBuilder

    original = OpBuilder.jit_load
    if getattr(original, "engine_hook", None) is before:
        return
    original = getattr(original, "engine_original", original)

    def jit_load(self: Any, verbose: bool = True) -> Any:
        # A build is local work of a minute or more: it does not count toward --startup_timeout.
        with startup.part("op_builds"), startup_guard.paused():
            before(self.name)
            return original(self, verbose)

    jit_load.engine_hook = before  # type: ignore[attr-defined]
    jit_load.engine_original = original  # type: ignore[attr-defined]
    OpBuilder.jit_load = jit_load
