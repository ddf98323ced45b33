"""LoRA through peft, and the optimizer parameter groups (decay / no decay / LoRA).

peft's `get_peft_model` is applied after the (possibly ZeRO-3-partitioned) model is built and
before `deepspeed.initialize`, the order that works under every ZeRO stage (the model-family smoke
tests train LoRA at ZeRO 0-3). Merging for a save happens on a gathered copy
(`engine.runtime.checkpoint`), never on the partitioned model.

peft turns each adapted Linear into 11 modules (base layer, lora_A and lora_B containers and their Linears,
dropout, empty embedding/DoRA containers). DeepSpeed walks every module of the model at each forward (its
engine hooks, ZeRO-3's fetch and release, `train()`/`eval()`), per decoded token in generation, and ZeRO-3
fetches each module's parameters with one all-gather. `apply_lora` therefore makes each plain LoRA Linear one
module, the shape of DeepSpeed-Chat's LoRA layer: the empty and no-op containers leave the module tree
(`_unregister_no_ops`), the base and adapter weights become the layer's own parameters under their usual names
(`_one_module_layers`: same state dict), and the layer gets a shorter forward for the one-adapter case
(`_lean_forward`: the same operations). ZeRO-3 then fetches base, lora_A and lora_B together, once.

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


def apply_lora(model: torch.nn.Module, lora: LoRAArgs, one_module_layers: bool = True) -> torch.nn.Module:
    """Wrap `model` with LoRA adapters (peft). What trains is DeepSpeed-Chat's rule: the adapters always, the
    weights of the adapted Linear layers never, and everything else (embeddings, norms, biases, the head, Linear
    layers without LoRA) unless --only_optimize_lora.
    `one_module_layers=False` keeps peft's own module tree (for comparisons: benchmarks/generation_bench.py)."""
    from peft import LoraConfig, get_peft_model
    from peft.tuners.lora import LoraLayer

    targets = lora_target_modules(model, lora.lora_module_name)
    config = LoraConfig(r=lora.lora_dim, lora_alpha=lora.lora_scaling, lora_dropout=0.0,
                        target_modules=targets, bias="none")
    # Adapters in the base model's dtype: DeepSpeed keeps fp32 master copies itself, and ZeRO needs
    # one dtype across a parameter group (peft's default upcasts bf16 adapters to fp32).
    peft_model = get_peft_model(model, config, autocast_adapter_dtype=False)
    if not lora.only_optimize_lora:
        adapted = {id(m.get_base_layer().weight) for m in peft_model.modules() if isinstance(m, LoraLayer)}
        for p in peft_model.parameters():
            p.requires_grad_(id(p) not in adapted)
    single = 0
    if one_module_layers:
        _unregister_no_ops(peft_model)
        single = _one_module_layers(peft_model)
    logger.info("LoRA rank %d on %d Linear layers (%s; %d of them one module each)", lora.lora_dim, len(targets),
                "LoRA only" if lora.only_optimize_lora else "their weights frozen, the rest trains", single)
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


# The children of a plain LoRA Linear once its no-op containers are gone (`_unregister_no_ops`).
_WEIGHT_CHILDREN = ("base_layer", "lora_A", "lora_B")


def _one_module_layers(model: torch.nn.Module) -> int:
    """Make each plain LoRA Linear of `model` one module; returns how many.

    The layer holds its base and adapter weights as its own parameters, under their usual names and in their
    usual order (`base_layer.weight`, `lora_A.default.weight`, ...), its children leave the module tree, and it
    gets a shorter forward (`_lean_forward`). The children stay plain attributes holding the same Parameter
    objects, so peft's own code (merge, disable, the delta weight, its forward) sees no difference, and the state
    dict keeps its keys and order. ZeRO-3 then fetches the layer with one all-gather, and each walk DeepSpeed
    makes per forward visits it once."""
    from peft.tuners.lora.layer import Linear

    layers = [m for m in model.modules() if type(m) is Linear and set(m._modules) == set(_WEIGHT_CHILDREN)
              and all(type(d) is torch.nn.Identity for d in m.lora_dropout.values())]
    for layer in layers:
        layer.__dict__["_held_children"] = tuple(layer._modules)  # peft's order: the state dict's
        for child_name in layer._held_children:
            layer.__dict__[child_name] = layer._modules.pop(child_name)  # found before Module.__getattr__
        _own_held_parameters(layer)
        layer.__class__ = _lean_class(Linear)
    return len(layers)


def _lean_forward(self: Any, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    """peft's Linear.forward for one plain LoRA adapter, with less Python per call (per decoded token): the same
    operations in the same order (`base(x) + B(A(x)) * scaling`, dropout 0), with the base (a torch Linear), A
    and B applied as functions rather than through their modules. Any other case (merged, disabled, several or
    absent adapters, a variant such as DoRA, extra arguments) goes to peft's forward."""
    active = self.active_adapters
    if (args or kwargs or len(active) != 1 or active[0] not in self.lora_A or self._disable_adapters
            or self.merged_adapters or self.lora_variant):
        return super(type(self), self).forward(x, *args, **kwargs)
    name = active[0]
    a_weight = self.lora_A[name].weight
    base = self.base_layer
    result = F.linear(x, base.weight, base.bias) if type(base) is torch.nn.Linear else base(x)
    x = self._cast_input_dtype(x, a_weight.dtype)
    lora = F.linear(F.linear(x, a_weight), self.lora_B[name].weight)
    return (result + lora * self.scaling[name]).to(result.dtype)


def _held_parameters(layer: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module, str]]:
    """(the layer's own key, the module holding it, the key there) for each weight of a one-module layer."""
    for child_name in layer._held_children:
        for sub_name, sub in layer.__dict__[child_name].named_modules(prefix=child_name):
            for key, param in sub._parameters.items():
                if param is not None:  # a Linear without bias holds None
                    yield f"{sub_name}.{key}", sub, key


def _own_held_parameters(layer: torch.nn.Module) -> None:
    """Make the layer's own parameters those its held modules hold, under their state-dict names (dotted keys)."""
    for own_key, sub, key in _held_parameters(layer):
        layer._parameters[own_key] = sub._parameters[key]


def _lean_load_from_state_dict(self: Any, state_dict: dict[str, Any], prefix: str, local_metadata: dict[str, Any],
                               strict: bool, missing_keys: list[str], unexpected_keys: list[str],
                               error_msgs: list[str]) -> None:
    """Load through the modules that hold the weights, as torch would if they were still children (its own
    check would call `base_layer.weight` unexpected: no child named `base_layer`); then the layer holds whatever
    they hold (`assign=True` replaces Parameter objects)."""
    for hook in self._load_state_dict_pre_hooks.values():  # what Module._load_from_state_dict runs first
        hook(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
    for child_name in self._held_children:
        for sub_name, sub in self.__dict__[child_name].named_modules(prefix=prefix + child_name):
            sub._load_from_state_dict(state_dict, sub_name + ".", local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)
    _own_held_parameters(self)


def _lean_apply(self: Any, fn: Any, recurse: bool = True) -> Any:
    """`Module._apply` (`to`, `float`, ...) on the layer's own parameters; the modules holding them then hold
    the same objects (torch may make new Parameters, with swap or overwrite-on-conversion set)."""
    out = super(type(self), self)._apply(fn, recurse)
    for own_key, sub, key in _held_parameters(self):
        sub._parameters[key] = self._parameters[own_key]
    return out


@functools.cache
def _lean_class(cls: type) -> type:
    return type(cls.__name__, (cls,), {"forward": _lean_forward, "_load_from_state_dict": _lean_load_from_state_dict,
                                       "_apply": _lean_apply, "__module__": cls.__module__,
                                       "__qualname__": cls.__qualname__})


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
        for p_name, _ in module.named_parameters(recurse=False):  # a one-module LoRA layer's: base_layer.bias
            if is_norm or p_name.rsplit(".", 1)[-1] == "bias":
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
