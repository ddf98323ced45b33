"""Tokenizer and causal-LM construction for any Hugging Face model family, ZeRO-3-safe.

ZeRO-3 models are built inside `zero3_construction`, which keeps transformers' `HfDeepSpeedConfig`
alive only while the model is made: transformers then creates it already partitioned (the working
route; `deepspeed.zero.Init` around a model class breaks HF's weight init).
"""
from __future__ import annotations

import contextlib
import copy
import logging
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from engine.config import DataArgs, ModelArgs
from engine.errors import UserError
from engine.models.paths import check_model_source, hub_error
from engine.preflight import missing_quantization_packages
from engine.runtime.distributed import DistInfo, barrier
from engine.runtime.ds_private import full_shape

logger = logging.getLogger("engine")

DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
# Config keys that hold a dropout probability across model families (OPT, GPT-2, Llama, NeoX...).
DROPOUT_KEYS = ("dropout", "attention_dropout", "hidden_dropout", "activation_dropout", "resid_pdrop",
                "embd_pdrop", "attn_pdrop", "summary_first_dropout", "classifier_dropout")


def resolve_model_path(model: ModelArgs, seed: int, dist: DistInfo, flag: str = "model_name_or_path",
                       hint: str = "", role: str = "sft") -> str:
    """The folder or hub name to load; builds the embedded tiny model when none is given.

    A local folder is checked here, before any data is read or anything written: it must hold a
    config.json that transformers reads and weights (`engine.models.paths` says what counts as local).
    `flag` and `role` name the model in error messages; `hint` is appended to them (e.g. which step writes it).
    """
    if model.model_name_or_path is None:
        from engine.models.tiny import ensure_tiny_model

        if dist.local_rank == 0:
            ensure_tiny_model(seed)
        barrier()
        return str(ensure_tiny_model(seed))
    return check_given_model(model, flag, hint, role)


def check_given_model(model: ModelArgs, flag: str = "model_name_or_path", hint: str = "", role: str = "sft"
                      ) -> str | None:
    """`resolve_model_path`'s checks of a given model, which read only the file system: a step runs them before
    DeepSpeed starts too, so a typo is reported in seconds. None: no model given (the built-in one)."""
    if model.model_name_or_path is None:
        return None
    source = check_model_source(model.model_name_or_path, role, flag, hint)
    if Path(source).is_dir():
        check_model_folder(Path(source), model, flag, hint, role)
    return source


# The weight files transformers reads from a local folder (one file, or an index of shards).
WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                "pytorch_model.bin.index.json")


def check_model_folder(path: Path, model: ModelArgs, flag: str, hint: str = "", role: str = "") -> None:
    """Refuse a local folder that is not a loadable Hugging Face model: no config.json, a config.json
    transformers cannot read, or no weights."""
    from transformers import AutoConfig

    if not (path / "config.json").is_file():
        raise UserError(f"--{flag} {path}: the folder has no config.json, so it is not a "
                        f"Hugging Face model folder{f' for the {role} model' if role else ''} (for a step output, "
                        f"point at the folder holding config.json){hint}")
    try:
        AutoConfig.from_pretrained(str(path), trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        raise hub_error(str(path), err, role) from None
    if not any((path / name).is_file() for name in WEIGHT_FILES):
        raise UserError(f"--{flag} {path}: the folder has no weights (no {' or '.join(WEIGHT_FILES[::2])}); "
                        f"copy the complete model folder, or rerun the step that writes it{hint}")


# Files of a saved tokenizer, one of which a local model folder needs (fast, sentencepiece, BPE or tiktoken
# vocabularies): names starting with one of the prefixes, or ending with one of the suffixes.
TOKENIZER_FILE_PREFIXES = ("tokenizer", "vocab", "merges", "spiece", "sentencepiece")
TOKENIZER_FILE_SUFFIXES = (".model", ".tiktoken")


def has_tokenizer_files(folder: Path) -> bool:
    return any(f.name.startswith(TOKENIZER_FILE_PREFIXES) or f.suffix in TOKENIZER_FILE_SUFFIXES
               for f in folder.iterdir())


def load_tokenizer(path: str, model: ModelArgs | None = None, data: DataArgs | None = None, *,
                   padding_side: str = "right", role: str = "") -> Any:
    """The tokenizer of a model folder or hub name, with a pad token (eos when it has none, as DeepSpeed-Chat).

    Training pads on the right (`padding_side="right"`); generation pads prompts on the left ("left").
    `model` gives trust_remote_code (default off); `data` adds its --eot_token with --add_eot_token; `role`
    names the model in errors."""
    model = model or ModelArgs()
    from transformers import AutoTokenizer

    folder = Path(path).expanduser()
    if folder.is_dir() and not has_tokenizer_files(folder):
        raise UserError(f"{path}{f' (the {role} model)' if role else ''} has no tokenizer files (tokenizer.json, "
                        "tokenizer_config.json, ...); save the tokenizer into the model folder "
                        "(tokenizer.save_pretrained(folder))")
    try:
        tok = AutoTokenizer.from_pretrained(path, padding_side=padding_side, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError, TypeError) as err:
        raise hub_error(path, err, role) from None
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise UserError(f"the tokenizer of {path} has neither a pad nor an eos token; add a pad "
                            "token to its tokenizer_config.json")
        logger.info("tokenizer has no pad token; using eos %r as pad (masked by attention_mask)", tok.eos_token)
        tok.pad_token = tok.eos_token
    if data is not None and data.add_eot_token and data.eot_token not in tok.get_vocab():
        tok.add_special_tokens({"additional_special_tokens": [data.eot_token]})
    return tok


@contextlib.contextmanager
def zero3_construction(ds_config: dict[str, Any] | None) -> Iterator[None]:
    """Make transformers build models partitioned for ZeRO-3 inside the block (no-op otherwise)."""
    stage = (ds_config or {}).get("zero_optimization", {}).get("stage", 0)
    if stage != 3:
        yield
        return
    from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

    keep_alive = HfDeepSpeedConfig(ds_config)  # transformers holds only a weak reference
    try:
        yield
    finally:
        unset_hf_deepspeed_config()
        del keep_alive


_PAD_WARNED: set[tuple[str, Any, int]] = set()  # (folder, config's pad id, tokenizer's): warned once per process


def warn_pad_mismatch(path: str, hf_config: Any, pad_token_id: int, role: str = "") -> None:
    """Warn when the folder's config.json names another pad id than its tokenizer (a DeepSpeed-Chat step-1 folder
    sets the config's to eos): the tokenizer's is used, since it is what the data is padded with."""
    config_pad = getattr(hf_config, "pad_token_id", None)
    key = (path, config_pad, pad_token_id)
    if config_pad is None or config_pad == pad_token_id or key in _PAD_WARNED:
        return
    _PAD_WARNED.add(key)
    logger.warning("%s%s: config.json has pad_token_id %s but the tokenizer's pad token id is %s; using %s (the "
                   "tokenizer's, which pads the data; attention masks hide the padding either way)", path,
                   f" (the {role} model)" if role else "", config_pad, pad_token_id, pad_token_id)


def configure_model_config(hf_config: Any, model: ModelArgs, pad_token_id: int) -> None:
    if model.dropout is not None:
        for key in DROPOUT_KEYS:
            if isinstance(getattr(hf_config, key, None), float):
                setattr(hf_config, key, model.dropout)
    hf_config.pad_token_id = pad_token_id
    hf_config.use_cache = False  # training; generation turns it back on


def hf_model(model: torch.nn.Module) -> Any:
    """The Hugging Face model inside an optional peft wrapper."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def resize_embeddings(model: torch.nn.Module, tokenizer: Any) -> None:
    """Grow the embeddings (to a multiple of 8) when the tokenizer gained tokens (--add_eot_token)."""
    emb = model.get_input_embeddings().weight
    if len(tokenizer) > full_shape(emb)[0]:
        model.resize_token_embeddings(len(tokenizer), pad_to_multiple_of=8)


def keep_bitsandbytes_out(quantized: bool) -> None:
    """Make bitsandbytes unimportable in a process that quantizes no role (call before transformers loads).

    peft imports bitsandbytes whenever it is installed, and transformers imports peft for its learning-rate
    schedules, so every run paid for it: on a CPU with AVX512-BF16 (bitsandbytes 0.50) the import asks
    the hub for a kernel, costs seconds and logs a warning per rank advising trust_remote_code=True.
    A None entry in sys.modules is Python's documented way to block an import: `import` raises
    ImportError and `importlib.util.find_spec` returns None, so peft and transformers see no bitsandbytes."""
    if not quantized and "bitsandbytes" not in sys.modules:
        sys.modules["bitsandbytes"] = None  # type: ignore[assignment]


def quantization_config(quantization: str, dtype: str) -> Any:
    """transformers' `BitsAndBytesConfig` of a --*_quantization value (None for 'none').

    4bit: NF4 (QLoRA's data type), one fp32 absmax per 64 weights, matmuls in the role's `dtype`;
    8bit: LLM.int8 (one fp32 scale per output row; outlier features in 16-bit). Embeddings, norms and
    the output head (lm_head, the reward model's score) stay in `dtype`, as transformers leaves them.
    """
    if quantization == "none":
        return None
    missing = missing_quantization_packages()
    if missing:
        raise UserError(f"{quantization} quantization needs {' and '.join(missing)}: pip install {' '.join(missing)}")
    from transformers import BitsAndBytesConfig

    if quantization == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=DTYPES[dtype])
    if quantization == "8bit":
        return BitsAndBytesConfig(load_in_8bit=True)
    raise ValueError(f"quantization must be none, 8bit or 4bit, not {quantization!r}")


def is_quantized_tensor(tensor: torch.Tensor) -> bool:
    """A bitsandbytes weight (packed 4-bit or int8 storage, with its scales beside it), not a plain tensor."""
    return type(tensor).__module__.startswith("bitsandbytes")


def is_quantized(module: torch.nn.Module) -> bool:
    """Whether `module` holds bitsandbytes-quantized weights (which ZeRO-3 cannot partition)."""
    return any(is_quantized_tensor(p) for p in module.parameters())


class _DropInt8CastWarning(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not str(record.msg).startswith("MatMul8bitLt: inputs will be cast")


def _quiet_int8_cast_warning() -> None:
    """LLM.int8 casts bf16/fp32 activations to fp16 for its matmuls, by design; bitsandbytes logs a warning
    for every layer on every call, which would bury the training log. Say it once instead."""
    bnb_logger = logging.getLogger("bitsandbytes.autograd._functions")
    if not any(isinstance(f, _DropInt8CastWarning) for f in bnb_logger.filters):
        bnb_logger.addFilter(_DropInt8CastWarning())
        logger.info("8-bit (LLM.int8) layers compute with fp16 inputs: bitsandbytes casts the activations")


def use_dequantizing_4bit_matmul(model: torch.nn.Module) -> None:
    """Keep every bitsandbytes 4-bit layer of `model` on its dequantize-then-matmul path on the CPU.

    On a CPU with AVX512-BF16, bitsandbytes (0.48-0.50 at least) repacks a 4-bit weight for a fused bf16
    kernel at the first eval-mode forward without grad, and keeps it repacked: the kernel rounds the
    absmax scales to bf16, so an eval forward differs from a train forward of the same weights, has no
    backward (the LoRA gradient through the frozen base is silently lost, with a torch warning), and
    `state_dict()` unpacks the weight with its scales still rounded, so a model that saved a checkpoint
    computes other numbers than the same model loaded from it (a resumed QLoRA run diverged from the
    uninterrupted one). The dequantizing path is exact (fp32 scales), differentiable and deterministic.
    """
    for module in model.modules():
        if hasattr(module, "support_avx512bf16_for_cpu"):  # bitsandbytes.nn.Linear4bit and its subclasses
            module.support_avx512bf16_for_cpu = False


def load_pretrained(auto_class: Any, path: str, model: ModelArgs, tokenizer: Any, dtype: str,
                    ds_config: dict[str, Any] | None, gradient_checkpointing: bool, quantization: str = "none",
                    device: torch.device | None = None, loading_info: dict[str, Any] | None = None, *,
                    role: str = "", **config_overrides: Any) -> torch.nn.Module:
    """`auto_class.from_pretrained(path)` ready for `deepspeed.initialize` (partitioned under ZeRO-3).

    `quantization` ('none', '8bit', '4bit'): load the decoder's Linear weights with bitsandbytes (see
    `quantization_config`) whole onto `device` (default CPU); ZeRO-3 cannot partition them, so
    `ds_config` must not be a ZeRO-3 config then. `loading_info`: filled with transformers' missing and
    unexpected keys. `config_overrides` set config attributes first (e.g. num_labels=1 for a reward model);
    `role` names the model in errors.
    """
    from transformers import AutoConfig

    try:
        hf_config = AutoConfig.from_pretrained(path, trust_remote_code=model.trust_remote_code)
    except (OSError, ValueError) as err:
        raise hub_error(path, err, role) from None
    for key, value in config_overrides.items():
        setattr(hf_config, key, value)
    warn_pad_mismatch(path, hf_config, tokenizer.pad_token_id, role)
    configure_model_config(hf_config, model, tokenizer.pad_token_id)
    quantized: dict[str, Any] = {}
    if quantization != "none":
        if (ds_config or {}).get("zero_optimization", {}).get("stage", 0) == 3:
            raise ValueError("a quantized model cannot be built for ZeRO-3 "
                             "(ZeRO cannot partition bitsandbytes weights)")
        if quantization == "8bit":
            _quiet_int8_cast_warning()
        quantized = {"quantization_config": quantization_config(quantization, dtype),
                     "device_map": {"": str(device or "cpu")}}
    with zero3_construction(ds_config):
        try:
            loaded = auto_class.from_pretrained(
                path, config=hf_config, dtype=DTYPES[dtype], attn_implementation=model.attn_implementation,
                trust_remote_code=model.trust_remote_code, output_loading_info=loading_info is not None, **quantized)
            if loading_info is not None:
                loaded, info = loaded
                loading_info.update(info)
        except (OSError, ValueError) as err:
            raise hub_error(path, err, role) from None
        resize_embeddings(loaded, tokenizer)
    if quantization == "4bit":
        use_dequantizing_4bit_matmul(loaded)
    if gradient_checkpointing:
        # Non-reentrant checkpointing needs no input grads, so it also works with frozen base weights.
        loaded.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    return loaded


def load_causal_lm(path: str, model: ModelArgs, tokenizer: Any, dtype: str,
                   ds_config: dict[str, Any] | None, gradient_checkpointing: bool, quantization: str = "none",
                   device: torch.device | None = None, role: str = "") -> torch.nn.Module:
    """A causal LM ready for `deepspeed.initialize` (`quantization`, `device`, `role`: see `load_pretrained`)."""
    from transformers import AutoModelForCausalLM

    return load_pretrained(AutoModelForCausalLM, path, model, tokenizer, dtype, ds_config, gradient_checkpointing,
                           quantization, device, role=role)


def meta_skeleton(model: torch.nn.Module) -> torch.nn.Module:
    """An empty (meta-device) model of the same class and config: no memory, no weight init."""
    with torch.device("meta"), torch.random.fork_rng(devices=[]):
        return type(model)(copy.deepcopy(model.config))


def copy_missing_buffers(skeleton: torch.nn.Module, live: torch.nn.Module, clone: bool = False) -> None:
    """Give a meta skeleton the live model's non-persistent buffers (rotary inv_freq...), which no
    state dict holds; ZeRO never partitions buffers, so they are whole. `clone`: CPU copies, not shared."""
    live_buffers = dict(live.named_buffers())
    for name, buf in list(skeleton.named_buffers()):
        if buf.is_meta and name in live_buffers:
            owner, _, leaf = name.rpartition(".")
            value = live_buffers[name].detach()
            skeleton.get_submodule(owner).register_buffer(leaf, value.cpu().clone() if clone else value,
                                                          persistent=False)


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """(B, T) positions that count real tokens only, so a left-padded row starts at position 0 as in
    training and in `generate` (a plain forward would count the padding)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
