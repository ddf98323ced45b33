"""LoRA through peft, and the optimizer parameter groups (decay / no decay / LoRA).

peft's `get_peft_model` is applied after the (possibly ZeRO-3-partitioned) model is built and
before `deepspeed.initialize`, the order that works under every ZeRO stage (the model-family smoke
tests train LoRA at ZeRO 0-3). Merging for a save happens on a gathered copy
(`engine.runtime.checkpoint`), never on the partitioned model.

peft turns each adapted Linear into three modules (base layer, lora_A, lora_B); ZeRO-3 would then
gather and release three times per Linear per forward (per decoded token in generation). When the base
weights train too, each LoRA layer is marked a ZeRO-3 leaf module, so its three weights are fetched
together, once. With --only_optimize_lora (a frozen base inside the layer) they are not: DeepSpeed 0.19.8's
backward then finds a released LoRA weight (size 0) when the parameters are partitioned
(tests/distributed/test_hybrid_generation.py trains that case).

Each peft LoRA layer is also 11 modules where the Linear was 1, and DeepSpeed walks every module of the model
at each forward (its engine hooks, ZeRO-3's fetch of a leaf, `train()`/`eval()`), per decoded token in
generation: `apply_lora` takes the layer's empty and no-op containers out of the module tree (`_unregister_no_ops`),
and gives peft's Linear a shorter forward for the one-adapter case (`_lean_forward`: the same operations).

`forwards_through_wrapper` makes peft's `generate` call the model through its wrapper, so that ZeRO-3
sees the forwards of generation as it sees those of training (see there).
"""
from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.nn.functional as F

from engine.config import LoRAArgs
from engine.errors import UserError

logger = logging.getLogger("engine")

AUTO = "auto"


def _is_linear(module: torch.nn.Module) -> bool:
    # transformers' Conv1D (GPT-2 family) is a Linear with transposed weight; peft handles both.
    return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Conv1D"


def lora_target_modules(model: torch.nn.Module, module_name: str) -> list[str]:
    """Qualified names of the Linear layers that get LoRA.

    'auto': every Linear layer except the output head(s); otherwise those whose name contains
    `module_name` (DeepSpeed-Chat's `--lora_module_name` meaning).
    """
    heads = set()
    out_emb = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    for name, module in model.named_modules():
        if module is out_emb or name.split(".")[-1] in ("lm_head", "score", "v_head", "classifier"):
            heads.add(name)
    names = [name for name, m in model.named_modules()
             if _is_linear(m) and name not in heads and (module_name == AUTO or module_name in name)]
    if not names:
        sample = [n for n, m in model.named_modules() if _is_linear(m)][:3]
        raise UserError(f"--lora_module_name {module_name!r} matches no Linear layer of "
                        f"{type(model).__name__} (its layers are named like {sample}); use 'auto' or a "
                        "fragment of those names, e.g. 'layers.' for Llama-family models")
    return names


def apply_lora(model: torch.nn.Module, lora: LoRAArgs) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft). Without --only_optimize_lora the base trains too."""
    from peft import LoraConfig, get_peft_model

    targets = lora_target_modules(model, lora.lora_module_name)
    config = LoraConfig(r=lora.lora_dim, lora_alpha=lora.lora_scaling, lora_dropout=0.0,
                        target_modules=targets, bias="none")
    # Adapters in the base model's dtype: DeepSpeed keeps fp32 master copies itself, and ZeRO needs
    # one dtype across a parameter group (peft's default upcasts bf16 adapters to fp32).
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if not lora.only_optimize_lora:
        for p in peft_model.parameters():
            p.requires_grad_(True)
    unregistered = _unregister_no_ops(peft_model)
    _use_lean_forward(peft_model)
    leaves = 0 if lora.only_optimize_lora else mark_zero3_leaves(peft_model)
    logger.info("LoRA rank %d on %d Linear layers (%s; %d empty peft sub-modules unregistered)",
                lora.lora_dim, len(targets),
                "LoRA only: one ZeRO-3 fetch per peft sub-module" if lora.only_optimize_lora else
                f"base weights train too; {leaves} layers fetched whole under ZeRO-3", unregistered)
    return peft_model


# peft LoraLayer containers that hold nothing for a plain LoRA Linear (embedding adapters, DoRA magnitudes)
# or only a no-op (dropout 0 is nn.Identity).
_NO_OP_CONTAINERS = ("lora_embedding_A", "lora_embedding_B", "lora_magnitude_vector", "lora_dropout")


def _is_no_op(container: torch.nn.Module) -> bool:
    return (next(container.parameters(), None) is None and next(container.buffers(), None) is None
            and all(type(m) is torch.nn.Identity for m in container.children()))


def _unregister_no_ops(model: torch.nn.Module) -> int:
    """Take each peft LoRA layer's empty or identity-only containers out of the module tree; returns how many.

    They stay plain attributes (peft's forward still looks `lora_dropout[name]` up), so the arithmetic and the
    state dict are unchanged; they just no longer cost a visit in every walk over the modules (an adapted Linear
    goes from 11 modules to 6).
    """
    from peft.tuners.lora import LoraLayer

    count = 0
    for layer in [m for m in model.modules() if isinstance(m, LoraLayer)]:
        for name in _NO_OP_CONTAINERS:
            container = layer._modules.get(name)
            if container is not None and _is_no_op(container):
                del layer._modules[name]
                layer.__dict__[name] = container  # found by attribute lookup before Module.__getattr__
                count += 1
    return count


def mark_zero3_leaves(model: torch.nn.Module) -> int:
    """Mark every peft LoRA layer of `model` a ZeRO-3 leaf module (one fetch for base + adapters); returns
    how many. Must run before `deepspeed.initialize`, which installs the hooks; ZeRO 0-2 ignore the mark."""
    from deepspeed.utils import set_z3_leaf_modules
    from peft.tuners.lora import LoraLayer

    classes = list(dict.fromkeys(type(m) for m in model.modules() if isinstance(m, LoraLayer)))
    return len(set_z3_leaf_modules(model, classes)) if classes else 0


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's Linear.forward for one plain LoRA adapter, with less Python per call (per decoded token): the same
    operations in the same order (`base(x) + B(A(x)) * scaling`, dropout 0), with A and B applied as functions
    rather than through their modules. Any other case (merged, disabled, several adapters, DoRA, extra
    arguments, or A and B fetched by ZeRO-3 on their own, outside a leaf) goes to peft's forward."""
    active = self.active_adapters
    a_weight = self.lora_A[active[0]].weight if len(active) == 1 and active[0] in self.lora_A else None
    if (a_weight is None or args or kwargs or self.disable_adapters or self.merged or self.lora_variant
            or not (getattr(self, "_z3_leaf", False) or not hasattr(a_weight, "ds_id"))):
        return super(type(self), self).forward(x, *args, **kwargs)
    name = active[0]
    result = self.base_layer(x)
    x = self._cast_input_dtype(x, a_weight.dtype)
    lora = F.linear(F.linear(x, a_weight), self.lora_B[name].weight)
    return (result + lora * self.scaling[name]).to(result.dtype)


@functools.cache
def _lean_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {"forward": _lean_forward, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


def _use_lean_forward(model: torch.nn.Module) -> None:
    from peft.tuners.lora.layer import Linear

    for module in model.modules():
        if type(module) is Linear and all(type(d) is torch.nn.Identity for d in module.lora_dropout.values()):
            module.__class__ = _lean_class(Linear)


class _Routing:
    """State of one `forwards_through_wrapper` block: the wrapper to call, and whether a call is inside it."""

    def __init__(self, wrapper: torch.nn.Module):
        self.wrapper, self.inside = wrapper, False


def _routed_call(self: torch.nn.Module, *args: Any, **kwargs: Any) -> Any:
    routing: _Routing = self.__dict__["_engine_routing"]
    if routing.inside:  # the wrapper's own call of this model: the model's usual __call__
        return super(type(self), self).__call__(*args, **kwargs)
    routing.inside = True
    try:
        return routing.wrapper(*args, **kwargs)
    finally:
        routing.inside = False


@functools.cache
def _routed_class(cls: type) -> type:
    # A subclass, because `self(...)` looks __call__ up on the type; same name, so transformers' checks
    # of the class name (cache kinds) see the same model.
    return type(cls.__name__, (cls,), {"__call__": _routed_call, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


@contextlib.contextmanager
def forwards_through_wrapper(module: torch.nn.Module) -> Iterator[None]:
    """Inside the block, a call of the Hugging Face model inside peft wrapper `module` (as `generate` makes,
    once per token) goes through `module` itself, which calls the model back; no-op without a wrapper.

    Why: ZeRO-3 starts each step of its parameter trace in a hook on the engine's root module (the peft
    wrapper) and, once a step's module order repeats, prefetches and keeps its persistent parameters.
    peft's `generate` calls the inner model directly, so under plain ZeRO-3 generation no step ever
    started: the trace never completed, every parameter (persistent ones too) was released after each
    use and fetched again, one all-gather each, and the trace of training's forward no longer matched.
    Through the wrapper, generation has the module order of training's forward, as without LoRA.
    """
    from engine.models.load import hf_model

    inner = hf_model(module)
    if inner is module:
        yield
        return
    cls = type(inner)
    inner.__dict__["_engine_routing"] = _Routing(module)  # not a Module attribute: no submodule registered
    inner.__class__ = _routed_class(cls)
    try:
        yield
    finally:
        inner.__class__ = cls
        del inner.__dict__["_engine_routing"]


def is_lora_param(name: str) -> bool:
    return "lora_A" in name or "lora_B" in name


def _no_decay_names(model: torch.nn.Module) -> set[str]:
    """Biases and the weights of every normalisation layer (by module type, for any family)."""
    out = set()
    for mod_name, module in model.named_modules():
        is_norm = "norm" in type(module).__name__.lower()
        for p_name, _ in module.named_parameters(recurse=False):
            if is_norm or p_name == "bias":
                out.add(f"{mod_name}.{p_name}" if mod_name else p_name)
    return out


def optimizer_param_groups(model: torch.nn.Module, weight_decay: float, lora_learning_rate: float
                           ) -> list[dict[str, Any]]:
    """DeepSpeed-Chat's three groups: decayed, LoRA (own learning rate), not decayed. Only trainable params."""
    no_decay = _no_decay_names(model)
    groups: dict[str, dict[str, Any]] = {
        "decay": {"params": [], "weight_decay": weight_decay},
        "lora": {"params": [], "weight_decay": weight_decay, "lr": lora_learning_rate},
        "no_decay": {"params": [], "weight_decay": 0.0},
    }
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        key = "lora" if is_lora_param(name) else "no_decay" if name in no_decay else "decay"
        groups[key]["params"].append(p)
    return [g for g in groups.values() if g["params"]]
