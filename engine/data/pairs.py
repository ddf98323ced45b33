"""Step-2 data: (chosen, rejected) token pairs, their cache, dataset and collator.

Each side is prompt + answer (+ the end token when it differs from the pad token, so that the last
real token is the same one Hugging Face's sequence-classification pooling reads). Pairs that cannot
teach a preference are skipped and counted: no rejected answer, or chosen and rejected identical
(also after truncation).

DPO (`load_dpo_pair_data`) reads the same slice, with two differences: the end token is always appended
(the policy must learn to stop; the attention mask, not the id, marks it real when it is the pad id), and
each side keeps its prompt length (the prompt tokenized alone, as step 1), so the log-probs cover the answer
only (`engine.rl.dpo.answer_actions`). Its items carry their row index in the split (`index`), the key of
the precomputed reference log-probs (`engine.data.ref_logps`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import DataArgs
from engine.data.cache import cache_key, cached_tensors, pack_sequences, sequence_at, split_tensors
from engine.data.rows import Row
from engine.data.sft import end_token_id, right_pad
from engine.data.split import phase_rows
from engine.errors import UserError
from engine.runtime.distributed import DistInfo

logger = logging.getLogger("engine")


@dataclass
class PairStats:
    rows: int = 0
    kept: int = 0
    no_rejected: int = 0
    identical: int = 0
    truncated: int = 0
    dropped_overlength: int = 0


def tokenize_scored(prompt: str, answer: str, tokenizer: Any, end_id: int, always_end: bool = False) -> list[int]:
    """Token ids of a sequence to score: prompt + answer, ending with `end_id` unless it is the pad id
    (`always_end`: also then)."""
    ids = tokenizer(prompt + answer)["input_ids"]
    if (always_end or end_id != tokenizer.pad_token_id) and (not ids or ids[-1] != end_id):
        ids = ids + [end_id]
    return ids


def tokenize_pair(row: Row, tokenizer: Any, end_id: int, always_end: bool = False) -> tuple[list[int], list[int]]:
    """Token ids of prompt + chosen and of prompt + rejected."""
    return (tokenize_scored(row.prompt, row.chosen, tokenizer, end_id, always_end),
            tokenize_scored(row.prompt, row.rejected, tokenizer, end_id, always_end))


def tokenize_pairs(rows: list[Row], tokenizer: Any, data: DataArgs, end_id: int, stats: PairStats,
                   prompt_lengths: list[int] | None = None) -> tuple[list[list[int]], list[list[int]]]:
    """(chosen ids, rejected ids) of the usable rows. Given a list, `prompt_lengths` receives each kept pair's
    prompt length (DPO: the end token is then always appended)."""
    dpo = prompt_lengths is not None
    chosen, rejected = [], []
    for row in rows:
        stats.rows += 1
        if row.rejected is None:
            stats.no_rejected += 1
            continue
        c, r = tokenize_pair(row, tokenizer, end_id, always_end=dpo)
        if max(len(c), len(r)) > data.max_seq_len:
            if data.overlength == "drop":
                stats.dropped_overlength += 1
                continue
            stats.truncated += 1
            c, r = c[:data.max_seq_len], r[:data.max_seq_len]
        if c == r:
            stats.identical += 1
            continue
        stats.kept += 1
        chosen.append(c)
        rejected.append(r)
        if dpo:
            prompt_lengths.append(len(tokenizer(row.prompt)["input_ids"]))
    return chosen, rejected


def _build(data: DataArgs, tokenizer: Any, seed: int, dpo: bool = False
           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    train_rows, eval_rows = phase_rows(data, tokenizer, 2, seed)
    end_id = end_token_id(tokenizer, data)
    tensors, meta = {}, {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if not rows:
            raise UserError(f"--data_split {data.data_split} gives step 2 no {split} rows; give step 2 a larger share "
                            "or more rows (or a folder with an eval.* file)")
        stats = PairStats()
        prompt_lengths: list[int] | None = [] if dpo else None
        chosen, rejected = tokenize_pairs(rows, tokenizer, data, end_id, stats, prompt_lengths)
        if not chosen:
            raise UserError(f"no usable {split} preference pairs for step 2 ({asdict(stats)}); " + (
                f"{stats.dropped_overlength} longer than --max_seq_len were dropped; raise the limit or use "
                "--overlength truncate"
                if stats.dropped_overlength else "rows need a 'rejected' answer that differs from 'chosen'; check "
                "--data_path and --data_split"))
        for side, seqs in (("chosen", chosen), ("rejected", rejected)):
            tensors |= {f"{split}/{side}_{k}": v for k, v in pack_sequences(seqs).items()}
        if dpo:
            tensors[f"{split}/prompt_lengths"] = torch.tensor(prompt_lengths, dtype=torch.int64)
        meta[f"{split}_stats"] = json.dumps(asdict(stats))
    return tensors, meta


def _log_stats(meta: dict[str, str], data: DataArgs) -> None:
    for split in ("train", "eval"):
        s = json.loads(meta[f"{split}_stats"])
        logger.info("%s pairs: %d rows, %d kept", split, s["rows"], s["kept"])
        if s["no_rejected"] or s["identical"]:
            logger.warning("%s pairs: skipped %d rows without a rejected answer and %d whose chosen and "
                           "rejected are identical", split, s["no_rejected"], s["identical"])
        if s["truncated"] or s["dropped_overlength"]:
            logger.warning("%s pairs: %d pairs over --max_seq_len %d were %s", split,
                           s["truncated"] + s["dropped_overlength"], data.max_seq_len,
                           "truncated" if data.overlength == "truncate" else "dropped")


def load_pair_data(data: DataArgs, tokenizer: Any, cache_dir: Path, seed: int, dist: DistInfo
                   ) -> tuple[PairDataset, PairDataset]:
    """Build (rank 0) or reuse the tokenized cache of step 2's slice, then load it on every rank."""
    path = cache_dir / f"pairs_{cache_key(data, tokenizer, 2, seed)}.safetensors"
    tensors, meta = cached_tensors(path, lambda: _build(data, tokenizer, seed), dist)
    _log_stats(meta, data)
    return tuple(PairDataset(split_tensors(tensors, split)) for split in ("train", "eval"))


def dpo_cache_path(data: DataArgs, tokenizer: Any, cache_dir: Path, seed: int) -> Path:
    """The tokenized DPO pairs' cache file; its name is the data's fingerprint (`engine.data.ref_logps`)."""
    return cache_dir / f"dpo_pairs_{cache_key(data, tokenizer, 2, seed, extra={'dpo': 1})}.safetensors"


def load_dpo_pair_data(data: DataArgs, tokenizer: Any, cache_dir: Path, seed: int, dist: DistInfo
                       ) -> tuple[DPOPairDataset, DPOPairDataset]:
    """Step 2's slice as DPO pairs (end token always, prompt lengths): built by rank 0 or reused, on every rank."""
    path = dpo_cache_path(data, tokenizer, cache_dir, seed)
    tensors, meta = cached_tensors(path, lambda: _build(data, tokenizer, seed, dpo=True), dist)
    _log_stats(meta, data)
    return tuple(DPOPairDataset(split_tensors(tensors, split)) for split in ("train", "eval"))


class PairDataset(torch.utils.data.Dataset):
    def __init__(self, tensors: dict[str, torch.Tensor]):
        self.t = tensors

    def __len__(self) -> int:
        return len(self.t["chosen_offsets"]) - 1

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {side: sequence_at(self.t[f"{side}_input_ids"], self.t[f"{side}_offsets"], i)
                for side in ("chosen", "rejected")}


def collate_pairs(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded (2B, T) input_ids and attention_mask: the B chosen rows, then the B rejected rows."""
    input_ids, mask = right_pad([b["chosen"] for b in batch] + [b["rejected"] for b in batch], pad_id)
    return {"input_ids": input_ids, "attention_mask": mask}


class DPOPairDataset(PairDataset):
    """Pairs with their prompt length and their row index in the split."""

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return super().__getitem__(i) | {"prompt_length": self.t["prompt_lengths"][i], "index": torch.tensor(i)}


def collate_dpo_pairs(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """`collate_pairs` plus prompt_lengths (2B,) in the same row order and index (B,), each pair's row."""
    out = collate_pairs(batch, pad_id)
    lengths = torch.stack([b["prompt_length"] for b in batch])
    return out | {"prompt_lengths": torch.cat([lengths, lengths]), "index": torch.stack([b["index"] for b in batch])}
