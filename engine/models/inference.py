"""Plain (non-DeepSpeed) loading and generation, for evaluation scripts and chat."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.config import ModelArgs
from engine.errors import UserError
from engine.models.load import load_tokenizer


def check_model_path(path: str) -> None:
    """Refuse a local path that does not exist or holds no config.json (a hub name passes)."""
    local = Path(path).expanduser()
    if local.exists() and not (local / "config.json").is_file():
        raise UserError(f"{path}: no config.json there; give a Hugging Face model folder (a step's --output_dir)")
    if not local.exists() and (path.startswith((".", "/", "~")) or path.count("/") > 1):
        raise UserError(f"{path}: no such model folder; give a Hugging Face model folder (a step's --output_dir) "
                        "or a hub name")


def _load_eval(auto_class: Any, path: str, trust_remote_code: bool, what: str) -> tuple[Any, Any]:
    """(`auto_class` model from `path` in eval mode, left-padding tokenizer); a failed load is a UserError."""
    check_model_path(path)
    tok = load_tokenizer(path, ModelArgs(trust_remote_code=trust_remote_code), padding_side="left")
    try:
        model = auto_class.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise UserError(f"cannot load {what} '{path}': {str(err).splitlines()[0][:200]}") from None
    return model.eval(), tok


def load_for_inference(path: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(model in eval mode, left-padding tokenizer) from a Hugging Face folder or hub name."""
    from transformers import AutoModelForCausalLM

    return _load_eval(AutoModelForCausalLM, path, trust_remote_code, "model")


def load_reward_for_inference(path: str, trust_remote_code: bool = False) -> tuple[Any, Any]:
    """(reward model in eval mode, tokenizer) from a step-2 folder: a plain Hugging Face
    `*ForSequenceClassification` with one label, as outside this engine."""
    from transformers import AutoModelForSequenceClassification

    if not (Path(path).expanduser() / "config.json").is_file():
        raise UserError(f"{path}: not a model folder (no config.json); give a step-2 --output_dir")
    model, tok = _load_eval(AutoModelForSequenceClassification, path, trust_remote_code, "reward model")
    if model.config.num_labels != 1:
        raise UserError(f"{path} has {model.config.num_labels} labels; a reward model has 1")
    return model, tok


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int = 64, **sampling: Any) -> list[str]:
    """The answers (decoded new tokens, special tokens dropped) to a batch of prompts."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
