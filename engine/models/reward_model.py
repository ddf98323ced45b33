"""The reward model: a Hugging Face `*ForSequenceClassification` (num_labels 1) read per token.

Its `score` layer is a bias-free Linear(hidden, 1): exactly the value head DeepSpeed-Chat puts on the
base transformer. Using the Hugging Face class means the saved folder loads with plain
`AutoModelForSequenceClassification.from_pretrained(folder)` and gives the same scores (its pooling
reads the last non-pad token, as `engine.rl.reward.end_scores` does), while `RewardModel` exposes the
per-token values that step 3's critic needs.
"""
from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch

from engine.config import LoRAArgs, ModelArgs
from engine.errors import UserError
from engine.models.convert_dschat import FORMAT_TEXT, converted_reward_folder, is_dschat_reward_folder
from engine.models.load import hf_model, load_pretrained, position_ids
from engine.models.paths import hub_error
from engine.rl.reward import end_scores
from engine.runtime.distributed import DistInfo, barrier

logger = logging.getLogger("engine")

HEAD = "score"  # the value head's attribute name in every transformers *ForSequenceClassification


class RewardModel(torch.nn.Module):
    """Per-token values of a sequence-classification model: forward(ids, mask) -> (B, T) float32."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model  # HF *ForSequenceClassification, possibly wrapped by peft
        inner = hf_model(model)
        if not isinstance(getattr(inner, HEAD, None), torch.nn.Linear):
            raise UserError(f"{type(inner).__name__} has no '{HEAD}' value head; the reward model must be a "
                            "transformers *ForSequenceClassification model")

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        inner = hf_model(self.model)
        hidden = inner.base_model(input_ids=input_ids, attention_mask=attention_mask,
                                  position_ids=position_ids(attention_mask)).last_hidden_state
        return getattr(inner, HEAD)(hidden).squeeze(-1).float()

    def scores(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """(B,) score of each sequence: the value at its last real token."""
        return end_scores(self(input_ids, attention_mask), attention_mask)


def load_reward_model(path: str, model: ModelArgs, tokenizer: Any, dtype: str, ds_config: dict[str, Any] | None,
                      gradient_checkpointing: bool, quantization: str = "none", device: torch.device | None = None,
                      role: str = "reward") -> RewardModel:
    """A reward model from a reward-model folder or, with a fresh value head, from a causal-LM folder.

    `quantization` ('none', '8bit', '4bit'), `device`: see `engine.models.load.load_pretrained`; the value head
    is never quantized (transformers keeps a model's last Linear layer in full precision). `role` names the
    model in errors and in the one line that says whether the value head is new or loaded."""
    from transformers import AutoModelForSequenceClassification

    info: dict[str, Any] = {}
    with held_load_report() as held:
        loaded = load_pretrained(AutoModelForSequenceClassification, path, model, tokenizer, dtype, ds_config,
                                 gradient_checkpointing, quantization, device, loading_info=info, role=role,
                                 num_labels=1)
    new_head = any(key.split(".")[0] == HEAD for key in info.get("missing_keys", ()))
    if not expected_load_report(info, new_head):
        for record in held:  # something other than the value head differs: show transformers' own report
            logging.getLogger(record.name).handle(record)
    logger.info("%s: value head (%s) %s %s", role, HEAD,
                "new, randomly initialised on top of" if new_head else "loaded from", path)
    return RewardModel(loaded)


# transformers logs its load report (missing and unexpected weights) as one WARNING record of this logger.
LOAD_REPORT_LOGGER = "transformers.modeling_utils"


@contextlib.contextmanager
def held_load_report() -> Iterator[list[logging.LogRecord]]:
    """Hold back transformers' load report while a model loads; yields the held records."""
    held: list[logging.LogRecord] = []

    def hold(record: logging.LogRecord) -> bool:
        if "LOAD REPORT" in str(record.msg):
            held.append(record)
            return False
        return True

    report_logger = logging.getLogger(LOAD_REPORT_LOGGER)
    report_logger.addFilter(hold)
    try:
        yield held
    finally:
        report_logger.removeFilter(hold)


def expected_load_report(info: dict[str, Any], new_head: bool) -> bool:
    """Whether a reward model's load report says only what is expected: nothing, or, for a value head made
    on a causal LM, that the head is new and the LM's output layer is left out. Anything else (a missing
    decoder weight, a size mismatch) is worth the user's attention."""
    missing = [k for k in info.get("missing_keys", ()) if k.split(".")[0] != HEAD]
    unexpected = [k for k in info.get("unexpected_keys", ()) if not (new_head and k.split(".")[0] == "lm_head")]
    return not (missing or unexpected or info.get("mismatched_keys") or info.get("error_msgs"))


def add_lora(model: RewardModel, lora: LoRAArgs) -> RewardModel:
    """LoRA on the reward model's transformer; the value head always trains (it is never a LoRA target)."""
    from engine.models.lora import apply_lora

    model.model = apply_lora(model.model, lora)
    getattr(hf_model(model.model), HEAD).requires_grad_(True)
    return model


def reward_model_folder(path: str, flag: str, trust_remote_code: bool, role: str = "reward",
                        dist: DistInfo | None = None) -> str:
    """The reward-model folder to load for --`flag` `path`: `path` itself when it is one of ours, its converted
    copy (made once, on local rank 0 of `dist`) when it is a DeepSpeed-Chat step-2 folder; refuses anything else."""
    if is_dschat_reward_folder(path):
        if dist is None or dist.local_rank == 0:
            converted_reward_folder(path)
        barrier()
        converted = str(converted_reward_folder(path))
        logger.info("--%s %s is a DeepSpeed-Chat step-2 folder; loading its conversion %s", flag, path, converted)
        return converted
    check_reward_model_config(path, flag, trust_remote_code, role)
    return path


def check_reward_model_config(path: str, flag: str, trust_remote_code: bool, role: str = "reward") -> None:
    """Refuse a folder that is not a reward model (a *ForSequenceClassification with one label)."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        raise hub_error(path, err, role) from None
    archs = config.architectures or []
    if not any(a.endswith("ForSequenceClassification") for a in archs) or config.num_labels != 1:
        raise UserError(f"--{flag} {path} (the {role} model) is not a reward model (architectures {archs}, "
                        f"{config.num_labels} labels); pass the folder step 2 wrote, or {FORMAT_TEXT}")
