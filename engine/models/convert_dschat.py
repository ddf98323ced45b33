"""DeepSpeed-Chat step-2 folders -> our reward-model folders.

DeepSpeed-Chat's step 2 saves its `RewardModel` as one `pytorch_model.bin` whose keys are the base
transformer's (`rwtransformer.*`, the `AutoModel` without LM head) plus `v_head.weight` (a bias-free
Linear(hidden, 1)), beside the causal LM's `config.json` and the tokenizer files. Our reward folders are
a transformers `*ForSequenceClassification` with one label, whose `score` layer is that same bias-free
Linear on the same base model: the conversion only renames the keys (`rwtransformer.` -> the class's
base-model prefix, `v_head.weight` -> `score.weight`) and rewrites the config's architecture, so the
scores are equal.

Step 3 converts such a folder on load (into the private cache, see `converted_reward_folder`); the same
conversion is a command:

    python -m engine.models.convert_dschat DSCHAT_STEP2_FOLDER OUR_REWARD_FOLDER
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from engine.errors import UserError
from engine.runtime.atomic import cache_root, publish_folder, staging_folder, write_cache_folder

logger = logging.getLogger("engine")

WEIGHTS = "pytorch_model.bin"  # DeepSpeed-Chat's save_hf_format writes this one file (never shards)
BASE_PREFIX = "rwtransformer."
HEAD_KEY = "v_head.weight"
# Files of the source folder not copied to ours: the weights and config we rewrite, and index files of
# weights we do not write.
NOT_COPIED = (WEIGHTS, "config.json", "model.safetensors", "model.safetensors.index.json",
              "pytorch_model.bin.index.json")
FORMAT_TEXT = f"a DeepSpeed-Chat step-2 folder ({WEIGHTS} with {BASE_PREFIX}* and {HEAD_KEY} keys)"


def _state_dict(weights: Path) -> dict[str, Any]:
    """The tensors of a torch-saved state dict, memory-mapped where the file allows (no copy in RAM)."""
    import torch

    try:
        return torch.load(weights, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # the legacy (non-zip) format cannot be memory-mapped
        return torch.load(weights, map_location="cpu", weights_only=True)


def is_dschat_reward_folder(path: str | Path) -> bool:
    """Whether `path` is a local folder in DeepSpeed-Chat's step-2 format (see the module docstring)."""
    weights = Path(path).expanduser() / WEIGHTS
    if not weights.is_file() or not (weights.parent / "config.json").is_file():
        return False
    try:
        keys = _state_dict(weights).keys()
    except Exception:  # noqa: BLE001 - any unreadable file is simply not in this format
        return False
    return HEAD_KEY in keys and any(k.startswith(BASE_PREFIX) for k in keys)


def _classifier(config: Any) -> type:
    """The transformers *ForSequenceClassification class of `config`'s model family."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING

    try:
        return MODEL_FOR_SEQUENCE_CLASSIFICATION_MAPPING[type(config)]
    except KeyError:
        raise UserError(f"model type {config.model_type!r} has no transformers *ForSequenceClassification class, so "
                        "its DeepSpeed-Chat reward model cannot be converted; use a model family transformers "
                        "supports for sequence classification (Llama, OPT, GPT-2, Mistral, Qwen2, ...)") from None


def _renamed(state: dict[str, Any], cls: type, config: Any, src: Path) -> dict[str, Any]:
    """Our keys for DeepSpeed-Chat's; refuses a state dict that does not fill the classifier."""
    import torch

    prefix = f"{cls.base_model_prefix}."
    out = {prefix + k[len(BASE_PREFIX):]: v for k, v in state.items() if k.startswith(BASE_PREFIX)}
    out["score.weight"] = state[HEAD_KEY].reshape(1, -1)
    with torch.device("meta"):
        expected = set(cls(config).state_dict())
    missing = sorted(expected - set(out))
    if missing:
        raise UserError(f"{src}/{WEIGHTS} lacks weights the {cls.__name__} needs ({', '.join(missing[:5])}"
                        f"{' ...' if len(missing) > 5 else ''}); pass the complete folder DeepSpeed-Chat's step 2 "
                        "wrote (with --zero_stage 3 it gathers the weights when saving)")
    unused = sorted(set(out) - expected)
    if unused:  # e.g. rotary inv_freq buffers older transformers saved; nothing the model reads
        logger.info("DeepSpeed-Chat reward folder %s: %d tensors the %s has no place for are left out (%s)",
                    src, len(unused), cls.__name__, ", ".join(unused[:3]))
    return {k: v.contiguous() for k, v in out.items() if k in expected}


def write_converted(src: Path, dst: Path) -> None:
    """Write the reward folder of DeepSpeed-Chat step-2 folder `src` into the (empty) folder `dst`."""
    from safetensors.torch import save_file
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(src))
    cls = _classifier(config)
    state = _renamed(_state_dict(src / WEIGHTS), cls, config, src)
    config.architectures = [cls.__name__]
    config.num_labels = 1
    save_file(state, str(dst / "model.safetensors"), metadata={"format": "pt"})
    config.save_pretrained(str(dst))
    for item in src.iterdir():
        if item.is_file() and item.name not in NOT_COPIED:
            shutil.copy2(item, dst / item.name)


def _require_format(src: Path, flag: str = "") -> None:
    if not is_dschat_reward_folder(src):
        where = f"--{flag} {src}" if flag else str(src)
        raise UserError(f"{where} is not {FORMAT_TEXT}; pass the folder DeepSpeed-Chat's step 2 wrote (its "
                        "--output_dir)")


def converted_reward_folder(src: str | Path) -> Path:
    """Our reward folder for DeepSpeed-Chat folder `src`, converted once into the private cache (keyed by the
    source's path, config and weights file size and time) and reused. Call on one rank per machine, then barrier."""
    src = Path(src).expanduser().resolve()
    _require_format(src)
    weights = (src / WEIGHTS).stat()
    key = hashlib.sha256(json.dumps([str(src), (src / "config.json").read_text(), weights.st_size,
                                     weights.st_mtime_ns]).encode()).hexdigest()[:12]
    target = cache_root() / f"dschat-reward-{key}"
    if not (target / "config.json").is_file():
        logger.info("converting DeepSpeed-Chat reward folder %s to a reward-model folder in %s", src, target)
        write_cache_folder(target, lambda staging: write_converted(src, staging),
                           f"cannot write the converted DeepSpeed-Chat reward model to {target}",
                           "free disk space, set RLHF_ENGINE_CACHE to a folder you can write to, or convert it "
                           "yourself with python -m engine.models.convert_dschat SRC DST")
    return target


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m engine.models.convert_dschat",
        description="Convert a DeepSpeed-Chat step-2 (reward model) folder into this engine's reward-model folder "
                    "(a transformers *ForSequenceClassification with one label), for step 3's "
                    "--critic_model_name_or_path or any transformers code. Scores are unchanged.")
    parser.add_argument("src", help="the folder DeepSpeed-Chat's step 2 wrote (pytorch_model.bin, config.json, "
                                    "tokenizer files)")
    parser.add_argument("dst", help="the folder to write (replaced if it exists)")
    args = parser.parse_args(argv)
    src, dst = Path(args.src).expanduser(), Path(args.dst).expanduser()
    _require_format(src)
    if dst.resolve() == src.resolve():
        raise UserError(f"{dst} is the source folder; write the converted model to another folder")
    with staging_folder(dst) as staging:
        write_converted(src, staging)
        publish_folder(staging, dst)
    logger.info("wrote %s (the reward model of DeepSpeed-Chat folder %s)", dst, src)


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    from engine.runtime.entry import run_main

    run_main(main)
