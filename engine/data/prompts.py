"""Step-3 data: the prompts of step 3's slice, tokenized and left-padded to --max_prompt_seq_len.

Prompts longer than the limit are dropped and counted (DeepSpeed-Chat drops them too): cutting a
prompt would change the question the actor answers.

Each prompt keeps its text and its row's other fields (e.g. `answer`, `ground_truth`) as columns, for the
reward functions (`engine.rewards`): the cache's safetensors file holds them as JSON text in a uint8
tensor beside the tokens (no pickle; written atomically with them). `PromptDataset.rows()` with
`collate_prompt_rows` gives them per batch.
"""
from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from engine.config import DataArgs
from engine.data.cache import (
    cache_key,
    cached_tensors,
    json_tensor,
    pack_sequences,
    sequence_at,
    split_tensors,
    tensor_json,
)
from engine.data.rows import Row
from engine.data.split import phase_rows
from engine.errors import UserError
from engine.runtime.distributed import DistInfo

logger = logging.getLogger("engine")


RESERVED = ("prompts", "completions")  # the reward functions' own arguments: no column may take these names
ROWS_FORMAT = 2  # in the cache key: 2 = the prompt texts and columns stored beside the tokens


def fitting_prompts(prompts: list[str], tokenizer: Any, max_prompt_len: int) -> tuple[list[list[int]], list[int]]:
    """(token ids of the prompts that fit `max_prompt_len`, their indices in `prompts`)."""
    seqs, kept = [], []
    for i, prompt in enumerate(prompts):
        ids = tokenizer(prompt)["input_ids"]
        if len(ids) <= max_prompt_len:
            seqs.append(ids)
            kept.append(i)
    return seqs, kept


def tokenize_prompts(prompts: list[str], tokenizer: Any, max_prompt_len: int) -> tuple[list[list[int]], int]:
    """(token ids of the prompts that fit, number dropped for being longer than `max_prompt_len`)."""
    seqs, kept = fitting_prompts(prompts, tokenizer, max_prompt_len)
    return seqs, len(prompts) - len(kept)


def _jsonable(value: Any) -> bool:
    if value is None or isinstance(value, (str, int, float, bool)):
        return True
    if isinstance(value, (list, tuple)):
        return all(_jsonable(v) for v in value)
    if isinstance(value, dict):
        return all(isinstance(k, str) and _jsonable(v) for k, v in value.items())
    return False


def column_names(rows: list[Row]) -> tuple[list[str], list[str]]:
    """(the columns the rows carry, in first-seen order; those left out because a value of theirs cannot be
    stored as JSON, e.g. bytes or a timestamp from a parquet file)."""
    names = list(dict.fromkeys(k for r in rows for k in r.columns))
    clash = [n for n in names if n in RESERVED]
    if clash:
        raise UserError(f"the prompt data has a field named {clash[0]!r}, the name of a reward-function argument; "
                        f"rename it with --prompt_column_map {clash[0]}=<another name>")
    bad = [n for n in names if not all(_jsonable(r.columns.get(n)) for r in rows)]
    return [n for n in names if n not in bad], bad


def column_table(rows: list[Row], names: list[str]) -> dict[str, list]:
    """One list per column, aligned with `rows`; None where a row lacks the field."""
    return {n: [r.columns.get(n) for r in rows] for n in names}


def _build(data: DataArgs, tokenizer: Any, seed: int, max_prompt_len: int, column_map: Mapping[str, str]
           ) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    train_rows, eval_rows = phase_rows(data, tokenizer, 3, seed, prompt_columns=column_map)
    names, left_out = column_names(train_rows + eval_rows)
    tensors, meta = {}, {"left_out_columns": json.dumps(left_out)}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        if not rows:
            raise UserError(f"--data_split {data.data_split} gives step 3 no {split} prompts; give step 3 a larger "
                            "share or more rows (or a folder with an eval.* file)")
        seqs, kept = fitting_prompts([r.prompt for r in rows], tokenizer, max_prompt_len)
        if not seqs:
            raise UserError(f"no usable {split} prompts for step 3: none of {len(rows)} fits --max_prompt_seq_len "
                            f"{max_prompt_len} (longer prompts are dropped); raise the limit")
        tensors |= {f"{split}/{k}": v for k, v in pack_sequences(seqs).items()}
        meta[f"{split}_stats"] = json.dumps({"rows": len(rows), "kept": len(seqs),
                                             "dropped_overlength": len(rows) - len(seqs)})
        rows = [rows[i] for i in kept]
        tensors[f"{split}/rows_json"] = json_tensor({"prompts": [r.prompt for r in rows],
                                                     "columns": column_table(rows, names)})
    return tensors, meta


def load_prompt_data(data: DataArgs, tokenizer: Any, max_prompt_len: int, cache_dir: Path, seed: int,
                     dist: DistInfo, column_map: Mapping[str, str] | None = None
                     ) -> tuple[PromptDataset, PromptDataset]:
    """Build (rank 0) or reuse the tokenized prompts of step 3's slice, then load them on every rank.

    Each dataset also holds the prompt texts and the rows' other fields as columns (`PromptDataset.rows`);
    `column_map` (--prompt_column_map, parsed) renames the fields of local files first."""
    column_map = dict(column_map or {})
    extra = {"max_prompt_seq_len": max_prompt_len, "prompt_column_map": column_map, "rows_format": ROWS_FORMAT}
    key = cache_key(data, tokenizer, 3, seed, extra=extra)
    tensors, meta = cached_tensors(cache_dir / f"prompts_{key}.safetensors",
                                   lambda: _build(data, tokenizer, seed, max_prompt_len, column_map), dist)
    for split in ("train", "eval"):
        s = json.loads(meta[f"{split}_stats"])
        logger.info("%s prompts: %d rows, %d kept", split, s["rows"], s["kept"])
        if s["dropped_overlength"]:
            logger.warning("%s prompts: dropped %d longer than --max_prompt_seq_len %d", split,
                           s["dropped_overlength"], max_prompt_len)
    left_out = json.loads(meta["left_out_columns"])
    if left_out:
        logger.warning("prompt data: left out the field(s) %s, which hold values JSON cannot store (e.g. bytes or "
                       "dates); the reward functions do not get them (store them as text or numbers to keep them)",
                       ", ".join(left_out))
    parts = [split_tensors(tensors, split) for split in ("train", "eval")]
    rows = [tensor_json(part.pop("rows_json")) for part in parts]
    return tuple(PromptDataset(part, r["prompts"], r["columns"]) for part, r in zip(parts, rows))


@dataclass(frozen=True)
class PromptRow:
    """One prompt with its text and its row's other fields (what the reward functions get)."""

    input_ids: torch.Tensor  # (P,) the prompt's tokens, P <= --max_prompt_seq_len
    prompt: str
    columns: dict[str, Any]


class PromptDataset(torch.utils.data.Dataset):
    """Step 3's tokenized prompts; an item is the prompt's token ids. `prompts` and `columns` (one list per
    field, aligned with the items) are the texts and other fields; `rows()` is the view whose items carry
    them, for `collate_prompt_rows`."""

    def __init__(self, tensors: dict[str, torch.Tensor], prompts: list[str] | None = None,
                 columns: dict[str, list] | None = None):
        self.ids, self.offsets = tensors["input_ids"], tensors["offsets"]
        self.prompts, self.columns = prompts, columns or {}
        if prompts is not None and len(prompts) != len(self):
            raise ValueError(f"{len(prompts)} prompt texts for {len(self)} tokenized prompts")
        if any(len(col) != len(self) for col in self.columns.values()):
            raise ValueError("every column needs one value per prompt")

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def __getitem__(self, i: int) -> torch.Tensor:
        return sequence_at(self.ids, self.offsets, i)

    def row(self, i: int) -> PromptRow:
        if self.prompts is None:
            raise ValueError("this PromptDataset was built without its prompt texts")
        return PromptRow(self[i], self.prompts[i], {k: col[i] for k, col in self.columns.items()})

    def rows(self) -> PromptRows:
        return PromptRows(self)


class PromptRows(torch.utils.data.Dataset):
    """The view of a PromptDataset whose items are `PromptRow`s (same length and order)."""

    def __init__(self, prompts: PromptDataset):
        self.prompts = prompts

    def __len__(self) -> int:
        return len(self.prompts)

    def __getitem__(self, i: int) -> PromptRow:
        return self.prompts.row(i)


def collate_left_padded(batch: list[torch.Tensor], pad_id: int, width: int) -> dict[str, torch.Tensor]:
    """Prompts left-padded to exactly `width` (--max_prompt_seq_len): input_ids and attention_mask (B, width).

    A fixed width means every answer starts at position `width` in the generated sequences.
    """
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, ids in enumerate(batch):
        input_ids[i, width - len(ids):], mask[i, width - len(ids):] = ids, 1
    return {"input_ids": input_ids, "attention_mask": mask}


def collate_prompt_rows(batch: list[PromptRow], pad_id: int, width: int, column_names: list[str] | None = None
                        ) -> dict[str, Any]:
    """`collate_left_padded`'s input_ids and attention_mask (B, width), plus "prompts" (B texts) and
    "columns" ({field: B values}, aligned with the rows) for the reward functions."""
    out: dict[str, Any] = collate_left_padded([r.input_ids for r in batch], pad_id, width)
    names = column_names if column_names is not None else list(dict.fromkeys(k for r in batch for k in r.columns))
    out["prompts"] = [r.prompt for r in batch]
    out["columns"] = {n: [r.columns.get(n) for r in batch] for n in names}
    return out
