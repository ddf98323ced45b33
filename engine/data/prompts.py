"""Step-3 data: the prompts of step 3's slice, tokenized and left-padded to --max_prompt_seq_len.

Prompts longer than the limit are dropped and counted (DeepSpeed-Chat drops them too): cutting a
prompt would change the question the actor answers.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from engine.config import DataArgs
from engine.data.cache import cache_key, cached_tensors, pack_sequences, sequence_at, split_tensors
from engine.data.split import phase_rows
from engine.errors import UserError
from engine.runtime.distributed import DistInfo

logger = logging.getLogger("engine")


def tokenize_prompts(prompts: list[str], tokenizer: Any, max_prompt_len: int) -> tuple[list[list[int]], int]:
    """(token ids of the prompts that fit, number dropped for being longer than `max_prompt_len`)."""
    kept, dropped = [], 0
    for prompt in prompts:
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) > max_prompt_len:
            dropped += 1
        else:
            kept.append(ids)
    return kept, dropped


def _build(data: DataArgs, tokenizer: Any, seed: int, max_prompt_len: int
           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    train_rows, eval_rows = phase_rows(data, tokenizer, 3, seed)
    tensors, meta = {}, {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if not rows:
            raise UserError(f"--data_split {data.data_split} gives step 3 no {split} prompts; give step 3 a larger "
                            "share or more rows (or a folder with an eval.* file)")
        seqs, dropped = tokenize_prompts([r.prompt for r in rows], tokenizer, max_prompt_len)
        if not seqs:
            raise UserError(f"no usable {split} prompts for step 3: none of {len(rows)} fits --max_prompt_seq_len "
                            f"{max_prompt_len} (longer prompts are dropped); raise the limit")
        tensors |= {f"{split}/{k}": v for k, v in pack_sequences(seqs).items()}
        meta[f"{split}_stats"] = json.dumps({"rows": len(rows), "kept": len(seqs), "dropped_overlength": dropped})
    return tensors, meta


def load_prompt_data(data: DataArgs, tokenizer: Any, max_prompt_len: int, cache_dir: Path, seed: int,
                     dist: DistInfo) -> tuple[PromptDataset, PromptDataset]:
    """Build (rank 0) or reuse the tokenized prompts of step 3's slice, then load them on every rank."""
    key = cache_key(data, tokenizer, 3, seed, extra={"max_prompt_seq_len": max_prompt_len})
    tensors, meta = cached_tensors(cache_dir / f"prompts_{key}.safetensors",
                                   lambda: _build(data, tokenizer, seed, max_prompt_len), dist)
    for split in ("train", "eval"):
        s = json.loads(meta[f"{split}_stats"])
        logger.info("%s prompts: %d rows, %d kept", split, s["rows"], s["kept"])
        if s["dropped_overlength"]:
            logger.warning("%s prompts: dropped %d longer than --max_prompt_seq_len %d", split,
                           s["dropped_overlength"], max_prompt_len)
    return tuple(PromptDataset(split_tensors(tensors, split)) for split in ("train", "eval"))


class PromptDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.ids, self.offsets = tensors["input_ids"], tensors["offsets"]

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return sequence_at(self.ids, self.offsets, i)


def collate_left_padded(batch: list[torch.Tensor], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded to exactly `width` (--max_prompt_seq_len): input_ids and attention_mask (B, width).

    A fixed width means every answer starts at position `width` in the generated sequences.
    """
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids):], mask[i, width - len(ids):] = ids, 1
    return {"input_ids": input_ids, "attention_mask": mask}
