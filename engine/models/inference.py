"""Plain (non-DeepSpeed) loading and generation, for evaluation scripts and chat."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from engine.config import ModelArgs
from engine.errors import UserError
from engine.models.load import load_tokenizer
from engine.models.paths import check_model_source, hub_error, looks_local, who

FOLDER_FIX = "; give a Hugging Face model folder (a step's --output_dir)"
REWARD_FOLDER_FIX = "; give a step-2 --output_dir (a reward model folder)"


def check_model_path(path: str, role: str, flag: str, hint: str = "") -> str:
    """`path` checked as the steps check theirs (`engine.models.paths`), plus: a local folder holds a
    config.json. `role` and `flag` name the model in errors."""
    source = check_model_source(path, role, flag, hint)
    if Path(source).is_dir() and not (Path(source) / "config.json").is_file():
        raise UserError(f"{who(role, flag)}: {path} has no config.json, so it is not a model folder"
                        f"{hint or FOLDER_FIX}")
    return source


def _load_eval(auto_class: Any, path: str, trust_remote_code: bool, role: str, flag: str,
               hint: str = "") -> tuple[Any, Any]:
    """(`auto_class` model from `path` in eval mode, left-padding tokenizer); a failed load is a UserError."""
    path = check_model_path(path, role, flag, hint)
    tok = load_tokenizer(path, ModelArgs(trust_remote_code=trust_remote_code), padding_side="left", role=role)
    try:
        model = auto_class.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise hub_error(path, err, role) from None
    return model.eval(), tok


def load_for_inference(path: str, trust_remote_code: bool = False, *, role: str = "chat",
                       flag: str = "path") -> tuple[Any, Any]:
    """(model in eval mode, left-padding tokenizer) from a Hugging Face folder or hub name; `role` and `flag`
    name it in errors."""
    from transformers import AutoModelForCausalLM

    return _load_eval(AutoModelForCausalLM, path, trust_remote_code, role, flag)


def load_reward_for_inference(path: str, trust_remote_code: bool = False, *,
                              flag: str = "model_name_or_path") -> tuple[Any, Any]:
    """(reward model in eval mode, tokenizer) from a step-2 folder: a plain Hugging Face
    `*ForSequenceClassification` with one label, as outside this engine, or a DeepSpeed-Chat step-2 folder
    (converted once into the cache, `engine.models.convert_dschat`)."""
    from transformers import AutoModelForSequenceClassification

    from engine.models.convert_dschat import converted_reward_folder, is_dschat_reward_folder

    if not looks_local(path):  # a step-2 folder, as before: the reward model is never fetched from the hub
        raise UserError(f"{who('reward', flag)}: {path} is not a model folder here{REWARD_FOLDER_FIX}")
    if is_dschat_reward_folder(path):
        path = str(converted_reward_folder(path))
    model, tok = _load_eval(AutoModelForSequenceClassification, path, trust_remote_code, "reward", flag,
                            REWARD_FOLDER_FIX)
    if model.config.num_labels != 1:
        raise UserError(f"{path} has {model.config.num_labels} labels; a reward model has 1")
    return model, tok


@torch.no_grad()
def generate(model: Any, tok: Any, prompts: list[str], max_new_tokens: int = 64, **sampling: Any) -> list[str]:
    """The answers (decoded new tokens, special tokens dropped) to a batch of prompts."""
    enc = tok(prompts, return_tensors="pt", padding=True)
    out = model.generate(**enc, max_new_tokens=max_new_tokens, pad_token_id=tok.pad_token_id, **sampling)
    return tok.batch_decode(out[:, enc["input_ids"].shape[1]:], skip_special_tokens=True)
