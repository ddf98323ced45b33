"""What the memory planner needs to know of a model: its config (a shipped one, stored as config JSON
without weights, or any Hugging Face folder) and exact parameter counts, read from the model built on
the meta device (no memory, no weights), so no per-family formula can drift from transformers' own.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

from engine.errors import UserError

ZOO_DIR = Path(__file__).parent / "zoo"


def shipped_models() -> list[str]:
    """Names of the shipped model configs (e.g. llama-2-7b, opt-1.3b, qwen2.5-7b)."""
    return sorted(p.stem for p in ZOO_DIR.glob("*.json"))


def load_config(name_or_path: str) -> Any:
    """A transformers config: a shipped name (case-insensitive), or a folder (or its config.json)."""
    from transformers import AutoConfig

    shipped = ZOO_DIR / f"{name_or_path.lower()}.json"
    if shipped.is_file():
        data = json.loads(shipped.read_text())
        return AutoConfig.for_model(data.pop("model_type"), **data)
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.name == "config.json":
        path = path.parent
    if not (path / "config.json").is_file():
        raise UserError(f"{name_or_path!r} is neither a shipped model config ({', '.join(shipped_models())}) nor a "
                        "folder with a config.json; give one of those")
    try:
        return AutoConfig.from_pretrained(str(path))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read the config in {path}: {str(err).splitlines()[0][:200]}") from None


@dataclass(frozen=True)
class ModelShape:
    params: int                # every parameter, tied ones once
    largest_layer_params: int  # the most parameters one module holds itself (DeepSpeed's ZeRO-3 estimator input)
    lora_targets: tuple[tuple[int, int], ...]  # (in, out) features of every Linear layer LoRA 'auto' targets
    num_layers: int
    hidden_size: int
    vocab_size: int
    kv_width: int              # key (= value) width per token per layer: kv heads x head dim
    intermediate_size: int = 0  # the MLP's inner width
    gated_mlp: bool = False     # SwiGLU-style MLP (gate and up projections): Llama, Qwen, Mistral
    rms_norm: bool = False      # RMSNorm (computed in fp32) rather than LayerNorm

    @property
    def linear_params(self) -> int:
        """Weights of the decoder's Linear layers (the 'auto' LoRA targets; what bitsandbytes quantizes)."""
        return sum(fan_in * fan_out for fan_in, fan_out in self.lora_targets)

    @property
    def linear_rows(self) -> int:
        return sum(fan_out for _, fan_out in self.lora_targets)

    def lora_params(self, rank: int) -> int:
        """Parameters LoRA of `rank` adds on the 'auto' targets: rank x (in + out) per Linear layer."""
        return sum(rank * (fan_in + fan_out) for fan_in, fan_out in self.lora_targets)

    def trainable_params(self, rank: int) -> int:
        """What trains without --only_optimize_lora: everything, or with LoRA of `rank` the adapters and
        everything but the adapted Linear weights ('auto' targets; engine.models.lora.apply_lora)."""
        return self.params - self.linear_params + self.lora_params(rank) if rank else self.params


def model_shape_of(config: Any, *, sequence_classification: bool = False) -> ModelShape:
    """The shape of the causal LM (or, with `sequence_classification`, the one-label reward model) of `config`."""
    return _shape(config.to_json_string(use_diff=False), sequence_classification)


@lru_cache(maxsize=64)
def _shape(config_json: str, sequence_classification: bool) -> ModelShape:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSequenceClassification

    from engine.models.lora import AUTO, lora_target_modules
    from engine.observe.perf import model_shape

    data = json.loads(config_json)
    config = AutoConfig.for_model(data.pop("model_type"), **data)
    if sequence_classification:
        config.num_labels = 1
    cls = AutoModelForSequenceClassification if sequence_classification else AutoModelForCausalLM
    with torch.device("meta"):
        model = cls.from_config(config)
    params = sum({id(p): p.numel() for p in model.parameters()}.values())
    largest = max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())
    modules = dict(model.named_modules())
    targets = tuple((modules[n].in_features, modules[n].out_features) for n in lora_target_modules(model, AUTO)
                    if hasattr(modules[n], "in_features"))
    layers, hidden, vocab = model_shape(config)
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv_heads = getattr(config, "num_key_value_heads", None) or heads
    inner = next((getattr(config, k) for k in ("intermediate_size", "ffn_dim", "n_inner")
                  if isinstance(getattr(config, k, None), int)), 4 * hidden)
    gated = any(name.endswith("gate_proj") for name in modules)
    rms = any("RMSNorm" in type(m).__name__ for m in modules.values())
    return ModelShape(params, largest, targets, layers, hidden, vocab, kv_heads * head_dim, inner, gated, rms)
