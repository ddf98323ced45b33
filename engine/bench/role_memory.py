"""Bytes a DeepSpeed engine holds on this rank, split into parameters, gradients and optimizer states,
on the accelerator ("gpu") and in host memory ("cpu"), counted from the live tensors.

What is counted, per storage (views of one buffer count once, at the buffer's full size):
- parameters: the module's parameters; under ZeRO-3 each keeps only its partition in `p.ds_tensor`
  (plus the parameters that stay gathered, below the persistence threshold); bitsandbytes' quantization
  scales (`quant_state.absmax`) too.
- gradients: every `.grad`, and the optimizer's gradient storage (ZeRO-1/2's averaged gradients,
  ZeRO-3's gradient partitions): tensors reached through an attribute whose name mentions grad.
- buffers: the gradient-reduction buckets (attributes named ipg or bucket). They are sized by DeepSpeed's
  `reduce_bucket_size`, not by the model: ZeRO-3 allocates 5e8 elements (1 GB in 16-bit) per trained
  role, however small the model (on a CPU mostly untouched, so little of it is resident).
- optimizer: everything else the optimizer object reaches: Adam's moments (`optimizer.state`) and the
  fp32 master copies (ZeRO's fp32 partitions).
The optimizer is walked generically (attributes, lists, dicts of DeepSpeed and torch.optim objects, not
modules), so the count follows DeepSpeed's layout of every ZeRO stage without naming its private fields;
a storage reached by several routes goes to the first of parameters, gradients, buffers, optimizer.
Gradients exist between backward and step, and Adam's moments from the first step on, so
`RoleMemoryTracker` counts during the optimizer steps and keeps the largest.
"""
from __future__ import annotations

import functools
from collections.abc import Iterator
from typing import Any

import torch

from engine.runtime.ds_private import inner_optimizer, partition, shadow_step

CATEGORIES = ("parameters", "gradients", "buffers", "optimizer")
KINDS = ("gpu", "cpu")
_BUCKET_WORDS = ("ipg", "bucket")
_MAX_DEPTH = 8


def _kind(t: torch.Tensor) -> str | None:
    if t.device.type == "meta":
        return None
    return "cpu" if t.device.type == "cpu" else "gpu"


def _storage_key(t: torch.Tensor) -> tuple[str, int, int] | None:
    """(device, address, bytes) of the tensor's whole storage, or None for an empty or meta tensor."""
    if t.device.type == "meta":
        return None
    storage = t.untyped_storage()
    if storage.nbytes() == 0:
        return None
    return str(t.device), storage.data_ptr(), storage.nbytes()


def _param_tensors(module: torch.nn.Module) -> Iterator[torch.Tensor]:
    for p in module.parameters():
        yield p
        if partition(p) is not None:
            yield partition(p)
        quant = getattr(p, "quant_state", None)
        if isinstance(getattr(quant, "absmax", None), torch.Tensor):
            yield quant.absmax


def _walk(obj: Any, path: str, depth: int, seen: set[int]) -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor reachable from `obj` through DeepSpeed / torch.optim objects."""
    if id(obj) in seen or depth > _MAX_DEPTH:
        return
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        yield path, obj
        if obj.grad is not None:
            yield path + ".grad", obj.grad
        return
    if isinstance(obj, torch.nn.Module):
        return
    if isinstance(obj, dict):
        for key, value in obj.items():
            if isinstance(key, torch.Tensor):
                yield from _walk(key, path + "{key}", depth + 1, seen)
            yield from _walk(value, f"{path}[{key if isinstance(key, str) else ''}]", depth + 1, seen)
    elif isinstance(obj, (list, tuple, set)):
        for value in obj:
            yield from _walk(value, path + "[]", depth + 1, seen)
    elif type(obj).__module__.startswith(("deepspeed", "torch.optim")) and hasattr(obj, "__dict__"):
        for name, value in vars(obj).items():
            yield from _walk(value, f"{path}.{name}", depth + 1, seen)


def role_memory(engine: Any) -> dict[str, dict[str, int]]:
    """{category: {"gpu": bytes, "cpu": bytes}} of one DeepSpeed engine (or plain module) on this rank."""
    module = getattr(engine, "module", engine)
    owner: dict[tuple[str, int, int], str] = {}
    for t in _param_tensors(module):
        key = _storage_key(t)
        if key is not None:
            owner.setdefault(key, "parameters")
    for p in module.parameters():
        if p.grad is not None and (key := _storage_key(p.grad)) is not None:
            owner.setdefault(key, "gradients")
    optimizer = getattr(engine, "optimizer", None)
    if optimizer is not None:
        found = [(_category(path), t) for path, t in _walk(optimizer, "optimizer", 0, set())]
        # In CATEGORIES order, so a storage reached both as a gradient and otherwise counts as a gradient.
        for category, t in sorted(found, key=lambda item: CATEGORIES.index(item[0])):
            key = _storage_key(t)
            if key is not None:
                owner.setdefault(key, category)
    out = {c: {k: 0 for k in KINDS} for c in CATEGORIES}
    for (device, _, nbytes), category in owner.items():
        out[category]["cpu" if device == "cpu" else "gpu"] += nbytes
    return out


def _category(path: str) -> str:
    """What a tensor the optimizer reaches through `path` (e.g. "optimizer.averaged_gradients[]") holds."""
    names = path.lower().replace("{key}", "")
    if any(word in names for word in _BUCKET_WORDS):
        return "buffers"
    return "gradients" if "grad" in names else "optimizer"


def merge_max(a: dict[str, dict[str, int]], b: dict[str, dict[str, int]]) -> dict[str, dict[str, int]]:
    """Element-wise maximum of two `role_memory` results."""
    return {c: {k: max(a[c][k], b[c][k]) for k in KINDS} for c in CATEGORIES}


class RoleMemoryTracker:
    """Counts `role_memory` of every role now, and for the trained ones at two moments of their optimizer
    steps: when `engine.step()` is called (the 16-bit gradients are alive) and when DeepSpeed calls the
    inner torch optimizer's `step` (ZeRO's fp32 gradient partitions are alive; the 16-bit ones may be
    freed by then). Keeps the largest value of each category. Both gradient forms can coexist briefly
    inside DeepSpeed's step, so the true gradient peak can exceed what is counted.

    Args:
        engines: role name -> DeepSpeed engine (None entries are skipped).
    """

    def __init__(self, engines: dict[str, Any]) -> None:
        self.engines = {name: e for name, e in engines.items() if e is not None}
        self.peaks = {name: role_memory(e) for name, e in self.engines.items()}
        self._undo: list[Any] = []  # undoes each `step` we shadowed

    def watch_steps(self, max_steps: int | None = None) -> None:
        """Count during the optimizer steps of the trained roles, the first `max_steps` engine steps only
        when given (sizes are fixed after the first step, and counting takes time the steps would show)."""
        for name, engine in self.engines.items():
            optimizer = getattr(engine, "optimizer", None)
            if optimizer is None:
                continue
            remaining = [max_steps if max_steps is not None else -1]
            inner = inner_optimizer(engine)
            if inner is not None:
                self._patch(inner, name, engine, remaining, counts_step=False)
            self._patch(engine, name, engine, remaining, counts_step=True)

    def _patch(self, obj: Any, name: str, engine: Any, remaining: list[int], counts_step: bool) -> None:
        def wrap(step: Any) -> Any:
            @functools.wraps(step)  # keeps the marks torch's LR scheduler looks for on optimizer.step
            def counted_step(*args: Any, **kwargs: Any) -> Any:
                if remaining[0] != 0:
                    self.peaks[name] = merge_max(self.peaks[name], role_memory(engine))
                try:
                    return step(*args, **kwargs)
                finally:
                    if counts_step and remaining[0] > 0:  # after the inner optimizer's step has been counted too
                        remaining[0] -= 1

            return counted_step

        self._undo.append(shadow_step(obj, wrap))

    def unwatch(self) -> None:
        for undo in reversed(self._undo):
            undo()
        self._undo.clear()

    def finish(self) -> dict[str, dict[str, dict[str, int]]]:
        """Stop watching, count once more (Adam's moments exist after the first step); the peaks in bytes."""
        self.unwatch()
        for name, engine in self.engines.items():
            self.peaks[name] = merge_max(self.peaks[name], role_memory(engine))
        return self.peaks
