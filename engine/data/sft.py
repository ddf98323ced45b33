"""Step-1 data: tokenise prompt + answer + end token, a pickle-free cache, the dataset and collator.

The cache holds unpadded token ids (padding happens per batch), in safetensors, under a name that is
a hash of everything that shapes it. Rank 0 builds it while the others wait, then all read it.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import DataArgs, Step1DataArgs
from engine.data.cache import cache_key, cached_tensors, pack_sequences, sequence_at, split_tensors
from engine.data.rows import Row
from engine.data.split import phase_rows
from engine.errors import UserError
from engine.rl.lm_loss import IGNORE_INDEX
from engine.runtime.distributed import DistInfo

logger = logging.getLogger("engine")


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_answer: int = 0


def end_token_id(tokenizer: Any, data: DataArgs) -> int:
    return tokenizer.convert_tokens_to_ids(data.eot_token) if data.add_eot_token else tokenizer.eos_token_id


def tokenize_sft_row(row: Row, tokenizer: Any, end_id: int) -> tuple[list[int], int]:
    """(ids of prompt + chosen + end token, number of prompt tokens), before any length limit.

    The prompt length is that of the prompt tokenised alone; answers start with a space (or a chat
    template's own marker), so the tokeniser does not merge across the boundary.
    """
    prompt_ids = tokenizer(row.prompt)["input_ids"]
    ids = tokenizer(row.prompt + row.chosen)["input_ids"]
    if not ids or ids[-1] != end_id:
        ids = ids + [end_id]
    return ids, min(len(prompt_ids), len(ids))


def tokenize_rows(rows: list[Row], tokenizer: Any, data: Step1DataArgs, end_id: int,
                  stats: TokenizeStats) -> tuple[list[list[int]], list[int]]:
    """Apply --max_seq_len and --overlength; count what was cut or dropped."""
    seqs, prompt_lens = [], []
    for row in rows:
        stats.rows += 1
        ids, n_prompt = tokenize_sft_row(row, tokenizer, end_id)
        if len(ids) > data.max_seq_len:
            if data.overlength == "drop":
                stats.dropped_overlength += 1
                continue
            stats.truncated += 1
            ids = ids[:data.max_seq_len]
        if n_prompt >= len(ids) and not data.train_on_prompt:
            stats.dropped_no_answer += 1  # the prompt alone fills the limit: nothing to learn from
            continue
        stats.kept += 1
        seqs.append(ids)
        prompt_lens.append(n_prompt)
    return seqs, prompt_lens


def _build(data: Step1DataArgs, tokenizer: Any, seed: int) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    train_rows, eval_rows = phase_rows(data, tokenizer, 1, seed)
    end_id = end_token_id(tokenizer, data)
    tensors, meta = {}, {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        stats = TokenizeStats()
        seqs, plens = tokenize_rows(rows, tokenizer, data, end_id, stats)
        if split == "train" and not seqs:
            too_long = stats.dropped_overlength + stats.dropped_no_answer
            hint = (f"{too_long} did not fit --max_seq_len {data.max_seq_len} (the prompt alone filled it, or "
                    "--overlength drop); raise the limit" if too_long else "check --data_path and --data_split")
            raise UserError(f"no usable training rows for step 1 ({asdict(stats)}); {hint}")
        tensors |= {f"{split}/{k}": v for k, v in pack_sequences(seqs).items()}
        tensors[f"{split}/prompt_lens"] = torch.tensor(plens, dtype=torch.int64)
        meta[f"{split}_stats"] = json.dumps(asdict(stats))
    return tensors, meta


def _log_stats(meta: dict[str, str], max_len: int, overlength: str) -> None:
    for split in ("train", "eval"):
        s = json.loads(meta[f"{split}_stats"])
        logger.info("%s data: %d rows, %d kept", split, s["rows"], s["kept"])
        if s["truncated"] or s["dropped_overlength"] or s["dropped_no_answer"]:
            logger.warning("%s data: %d rows over --max_seq_len %d were %s; %d dropped because the prompt "
                           "alone filled the limit", split, s["truncated"] + s["dropped_overlength"],
                           max_len, "truncated" if overlength == "truncate" else "dropped",
                           s["dropped_no_answer"])


def load_sft_data(data: Step1DataArgs, tokenizer: Any, cache_dir: Path, seed: int, dist: DistInfo
                  ) -> tuple[SFTDataset, SFTDataset]:
    """Build (rank 0) or reuse the tokenized cache, then load it on every rank."""
    path = cache_dir / f"sft_{cache_key(data, tokenizer, 1, seed)}.safetensors"
    tensors, meta = cached_tensors(path, lambda: _build(data, tokenizer, seed), dist)
    _log_stats(meta, data.max_seq_len, data.overlength)
    return tuple(SFTDataset(split_tensors(tensors, split), data.train_on_prompt) for split in ("train", "eval"))


# ----------------------------------------------------------------------------------------------
# Dataset and collator
# ----------------------------------------------------------------------------------------------
class SFTDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor], train_on_prompt: bool):
        self.ids, self.offsets, self.prompt_lens = tensors["input_ids"], tensors["offsets"], tensors["prompt_lens"]
        self.train_on_prompt = train_on_prompt

    def __len__(self) -> int:
        return len(self.prompt_lens)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        ids = sequence_at(self.ids, self.offsets, i)
        labels = ids.clone()
        if not self.train_on_prompt:
            labels[:self.prompt_lens[i]] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def right_pad(seqs: list[torch.Tensor], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, T) input_ids padded on the right with `pad_id`, and the (B, T) attention mask."""
    width = max(len(s) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, s in enumerate(seqs):
        input_ids[i, :len(s)], mask[i, :len(s)] = s, 1
    return input_ids, mask


def collate_right_padded(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids (B, T), attention_mask (B, T), labels (B, T) (-100 on pad)."""
    input_ids, mask = right_pad([b["input_ids"] for b in batch], pad_id)
    labels = torch.full_like(input_ids, IGNORE_INDEX)
    for i, b in enumerate(batch):
        labels[i, :len(b["labels"])] = b["labels"]
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
