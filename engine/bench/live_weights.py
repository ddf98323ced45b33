"""What weights a process holds, counted from its live modules (for benchmarks: the DPO reference modes).

Every `torch.nn.Module` the garbage collector can see is walked; each parameter's and buffer's storage is
counted once (tied or shared weights, views), so a second model shows up as its own bytes and a model wrapped
by another (peft's LoRA around a transformers model) as one.
"""
from __future__ import annotations

import gc
from collections.abc import Iterable

import torch


def _storages(modules: Iterable[torch.nn.Module]) -> dict[tuple[str, int], int]:
    out = {}
    for m in modules:
        for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]:
            s = t.untyped_storage()
            out[(str(t.device), s.data_ptr())] = s.nbytes()
    return out


def _held(module: torch.nn.Module) -> list[torch.nn.Module]:
    """The modules `module` holds: its children, and modules kept as plain attributes (a one-module LoRA layer's
    base layer and adapters, engine.models.lora)."""
    return [*module.children(), *(v for v in vars(module).values() if isinstance(v, torch.nn.Module))]


def live_modules(collect: bool = True) -> list[torch.nn.Module]:
    """Every `torch.nn.Module` alive in this process (after a garbage collection, unless `collect` is False:
    then modules kept alive only by reference cycles are still there)."""
    if collect:
        gc.collect()
    return [o for o in gc.get_objects() if isinstance(o, torch.nn.Module)]


def count_weights(mine: torch.nn.Module, modules: list[torch.nn.Module]) -> dict[str, int]:
    """{"live_module_bytes": the parameters and buffers of `modules`, "policy_bytes": those of `mine` (the model
    being trained), "non_policy_bytes": the rest (what a reference holds), "models_with_weights": modules
    that hold weights and sit inside no other of `modules`}."""
    every, own = _storages(modules), _storages(mine.modules())
    inside = {id(c) for m in modules for c in _held(m)}
    outer = [m for m in modules if id(m) not in inside and _storages(m.modules())]
    return {"live_module_bytes": sum(every.values()), "policy_bytes": sum(own.values()),
            "non_policy_bytes": sum(n for k, n in every.items() if k not in own), "models_with_weights": len(outer)}


def live_weights(mine: torch.nn.Module) -> dict[str, int]:
    """`count_weights` over every live module of the process."""
    return count_weights(mine, live_modules())
