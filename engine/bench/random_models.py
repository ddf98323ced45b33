"""Random-weight Hugging Face model folders of any shape, for benchmarks: no download, no training.

A shape is a shipped planner config (`engine.planner.shapes.shipped_models()`: llama-2-7b, opt-1.3b,
qwen2.5-7b, ...), any folder with a config.json, or `tiny` (the embedded tiny Llama), optionally scaled
down (`scaled_config_dict`) so a 7B-like shape runs on a CPU. Every folder carries the embedded tiny
tokenizer; an actor is saved as `AutoModelForCausalLM`, a critic as `AutoModelForSequenceClassification`
with one label (what step 2 writes), both loadable by step 3 as they are.

Folders are written fast and in bounded memory: the model is built on the meta device (no memory and
none of transformers' per-module weight init), then every tensor is drawn in the target dtype (on the
GPU when there is one) and streamed to safetensors shards of at most `SHARD_BYTES`, so a 7B folder
never holds more than one shard in host memory. A folder is keyed by a hash of the config, role, dtype
and seed, written to a temporary name and renamed, so concurrent processes and crashes never leave
half a model behind.
"""
from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.runtime.atomic import write_cache_folder

logger = logging.getLogger("engine")

SHARD_BYTES = 2 * 2**30
ROLES = ("actor", "critic")
# Bump when the folder layout or the initialisation changes, so old cache entries are not reused.
FORMAT_VERSION = 1

# Config keys of each shape knob across model families (Llama/Qwen/Mistral, OPT, GPT-2 style).
LAYER_KEYS = ("num_hidden_layers", "n_layer", "num_layers")
HIDDEN_KEYS = ("hidden_size", "n_embd", "d_model")
INTERMEDIATE_KEYS = ("intermediate_size", "ffn_dim", "n_inner")
HEAD_KEYS = ("num_attention_heads", "n_head")


def scaled_config_dict(config: dict[str, Any], *, num_layers: int | None = None, hidden_size: int | None = None,
                       intermediate_size: int | None = None, num_heads: int | None = None) -> dict[str, Any]:
    """A copy of a config dict (`PretrainedConfig.to_dict()`) with the given shape knobs changed.

    Key/value heads keep their grouping: a model with as many KV heads as query heads (MHA) keeps it;
    a grouped-query model keeps its query heads per KV head, so `num_heads` must be a multiple of that
    group. An explicit `head_dim` follows hidden_size / heads; OPT's `word_embed_proj_dim` follows the
    hidden size where it was equal to it; a per-layer `layer_types` list is cut or extended."""
    out = dict(config)
    old_layers = config_value(out, LAYER_KEYS)
    old_hidden, old_heads = config_value(out, HIDDEN_KEYS), config_value(out, HEAD_KEYS)
    for value, keys, flag in ((num_layers, LAYER_KEYS, "--num_layers"), (hidden_size, HIDDEN_KEYS, "--hidden_size"),
                              (intermediate_size, INTERMEDIATE_KEYS, "--intermediate_size"),
                              (num_heads, HEAD_KEYS, "--num_heads")):
        if value is None:
            continue
        if value <= 0:
            raise UserError(f"{flag} {value}: give a positive number")
        present = [k for k in keys if out.get(k) is not None]
        if not present:
            raise UserError(f"{flag}: the {out.get('model_type', '?')} config has none of {', '.join(keys)}; "
                            "drop the flag for this model")
        for key in present:
            out[key] = value
    hidden, heads = config_value(out, HIDDEN_KEYS), config_value(out, HEAD_KEYS)
    if hidden is None or heads is None:
        return out
    if hidden % heads:
        raise UserError(f"hidden size {hidden} is not a multiple of {heads} attention heads; change --hidden_size "
                        "or --num_heads")
    old_kv = out.get("num_key_value_heads")
    if num_heads is not None and old_kv is not None:
        if old_kv == old_heads:
            out["num_key_value_heads"] = heads
        else:
            group = old_heads // old_kv
            if heads % group:
                raise UserError(f"--num_heads {heads}: the model groups {group} query heads per key/value head, "
                                f"so give a multiple of {group}")
            out["num_key_value_heads"] = heads // group
    if out.get("head_dim") is not None and (hidden, heads) != (old_hidden, old_heads):
        out["head_dim"] = hidden // heads
    if out.get("word_embed_proj_dim") is not None and out["word_embed_proj_dim"] == old_hidden:
        out["word_embed_proj_dim"] = hidden
    layers = config_value(out, LAYER_KEYS)
    if isinstance(out.get("layer_types"), list) and layers != old_layers:
        types = out["layer_types"]
        out["layer_types"] = [types[min(i, len(types) - 1)] for i in range(layers)]
    if out.get("max_window_layers") is not None and old_layers is not None and out["max_window_layers"] >= old_layers:
        out["max_window_layers"] = layers
    return out


def config_value(config: dict[str, Any], keys: tuple[str, ...]) -> Any:
    """The first of `keys` a config dict sets (families name the same knob differently), or None."""
    return next((config[k] for k in keys if config.get(k) is not None), None)


def load_shape(name_or_path: str, **overrides: int | None) -> Any:
    """The transformers config of a benchmark shape: 'tiny', a shipped name or a folder, scaled by
    `overrides` (see `scaled_config_dict`), with the embedded tokenizer's special ids and a vocabulary
    at least as large as that tokenizer."""
    from transformers import AutoConfig, LlamaConfig

    from engine.models.tiny import TINY_LLAMA

    tok = embedded_tokenizer()
    if name_or_path.lower() == "tiny":
        base = LlamaConfig(vocab_size=len(tok), **TINY_LLAMA).to_dict()
    else:
        from engine.planner.shapes import load_config

        base = load_config(name_or_path).to_dict()
    data = scaled_config_dict(base, **overrides)
    data.update(bos_token_id=tok.eos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    if data.get("vocab_size", 0) < len(tok):
        logger.warning("%s: vocab_size %s is below the tokenizer's %d tokens; raised to %d", name_or_path,
                       data.get("vocab_size"), len(tok), len(tok))
        data["vocab_size"] = len(tok)
    for key in ("architectures", "id2label", "label2id", "num_labels", "transformers_version"):
        data.pop(key, None)
    return AutoConfig.for_model(data.pop("model_type"), **data)


def embedded_tokenizer() -> Any:
    from transformers import AutoTokenizer

    from engine.models.tiny import TOKENIZER_DIR

    return AutoTokenizer.from_pretrained(str(TOKENIZER_DIR))


def random_model_dir(config: Any, role: str, dtype: str, seed: int, cache_root: Path) -> Path:
    """The cache folder of a random `role` model of `config` in `dtype` from `seed`."""
    from engine.models.tiny import TOKENIZER_DIR

    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    blob = json.dumps([FORMAT_VERSION, config.to_json_string(use_diff=False), role, dtype, seed]).encode()
    key = hashlib.sha256(blob + (TOKENIZER_DIR / "tokenizer.json").read_bytes()).hexdigest()[:12]
    return cache_root / f"{config.model_type}-{role}-{dtype}-{key}"


def ensure_random_model(config: Any, role: str, dtype: str, seed: int, cache_root: Path,
                        device: str = "cpu") -> Path:
    """Write the folder of `random_model_dir` if it is not there yet (on one rank, then barrier); return it."""
    target = random_model_dir(config, role, dtype, seed, cache_root)
    if (target / "config.json").is_file():
        return target
    write_cache_folder(target, lambda folder: _write_random_model(config, role, dtype, seed, folder, device),
                       f"cannot write the random-weight model folder {target}",
                       "free disk space or give --cache_dir another place")
    return target


def _write_random_model(config: Any, role: str, dtype: str, seed: int, folder: Path, device: str) -> None:
    import copy

    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    from engine.models.load import DTYPES

    config = copy.deepcopy(config)
    if role == "critic":
        config.num_labels = 1
    auto = AutoModelForSequenceClassification if role == "critic" else AutoModelForCausalLM
    torch_dtype = DTYPES[dtype]
    with torch.device("meta"):
        skeleton = auto.from_config(config, dtype=torch_dtype)
    config.architectures = [type(skeleton).__name__]
    config.dtype = torch_dtype
    tensors = _unique_state(skeleton)
    std = float(getattr(config, "initializer_range", None) or getattr(config, "init_std", None) or 0.02)
    generator = torch.Generator(device=device).manual_seed(seed)
    shards = _shard_plan(tensors)
    names = (["model.safetensors"] if len(shards) == 1 else
             [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))])
    weight_map = {}
    for file, shard in zip(names, shards):
        block = {name: _random_tensor(name, tensors[name], std, generator, device).cpu() for name in shard}
        save_file(block, str(folder / file), metadata={"format": "pt"})
        weight_map |= {name: file for name in shard}
        del block
    if len(shards) > 1:
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    config.save_pretrained(str(folder))
    embedded_tokenizer().save_pretrained(str(folder))


def _unique_state(model: Any) -> dict[str, Any]:
    """name -> meta tensor of every persistent tensor, a tied weight once (under its first name, which
    is the one transformers saves and ties the others to)."""
    seen, out = set(), {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        if id(tensor) not in seen:
            seen.add(id(tensor))
            out[name] = tensor
    return out


def _shard_plan(tensors: dict[str, Any]) -> list[list[str]]:
    """Names grouped in order into shards of at most SHARD_BYTES (a larger single tensor gets its own)."""
    shards: list[list[str]] = [[]]
    size = 0
    for name, t in tensors.items():
        nbytes = t.numel() * t.element_size()
        if shards[-1] and size + nbytes > SHARD_BYTES:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += nbytes
    return shards


def _random_tensor(name: str, meta: Any, std: float, generator: Any, device: str) -> Any:
    """Matrices (Linear, embedding) ~ N(0, std) as transformers initialises them; vectors named weight
    (norm scales) ones; biases and other vectors zeros."""
    import torch

    out = torch.empty(meta.shape, dtype=meta.dtype, device=device)
    if out.dim() >= 2 and out.is_floating_point():
        out.normal_(0.0, std, generator=generator)
    elif name.endswith("weight"):
        out.fill_(1.0)
    else:
        out.zero_()
    return out
