"""PTX data for step 3 (`--unsupervised_dataset_name`): plain text, tokenized, concatenated with eos
between documents and cut into blocks of --max_prompt_seq_len + --max_answer_seq_len tokens (the
last, partial block is dropped), as DeepSpeed-Chat groups it.

Sources: a hub dataset (`datasets.load_dataset(name, config)`, its train split, column 'text'), or a
local file: .txt (one document per non-empty line), .jsonl/.json/.parquet with a 'text' field (or
step-1 rows, whose prompt + answer is the text), or a folder holding train.<one of those>.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import torch

from engine.config import Step3DataArgs
from engine.data.cache import CACHE_VERSION, cached_tensors, digest, source_fingerprint, tokenizer_fingerprint
from engine.data.sources import _decode, _records, record_to_row
from engine.errors import UserError
from engine.runtime.distributed import DistInfo

logger = logging.getLogger("engine")

TEXT_SUFFIXES = (".txt", ".jsonl", ".json", ".parquet")


def _local_texts(path: Path, tokenizer: Any) -> list[str]:
    if path.is_dir():
        files = [path / f"train{s}" for s in TEXT_SUFFIXES if (path / f"train{s}").is_file()]
        if not files:
            raise UserError(f"--unsupervised_dataset_name {path}: no train.txt/.jsonl/.json/.parquet in this folder")
        path = files[0]
    if path.suffix not in TEXT_SUFFIXES:
        raise UserError(f"--unsupervised_dataset_name {path}: unsupported file type; "
                        "use .txt, .jsonl, .json or .parquet")
    if path.suffix == ".txt":
        return [line for line in _decode(path.read_bytes(), str(path)).splitlines() if line.strip()]
    texts = []
    for where, record in _records(path):
        if isinstance(record, dict) and isinstance(record.get("text"), str):
            texts.append(record["text"])
        else:
            row = record_to_row(record, tokenizer, where)
            texts.append(row.prompt + row.chosen)
    return [t for t in texts if t.strip()]


def _hub_texts(name: str, config_name: str | None, num_proc: int | None) -> list[str]:
    import datasets

    try:
        ds = datasets.load_dataset(name, config_name, split="train", num_proc=num_proc)
    except Exception as err:  # datasets raises many types for a missing name, config or network
        raise UserError(f"--unsupervised_dataset_name {name} (config {config_name}): cannot load it "
                        f"({type(err).__name__}: {str(err).splitlines()[0][:200]}); check the names and "
                        "your network, or pass a local .txt/.jsonl file") from None
    if "text" not in ds.column_names:
        raise UserError(f"--unsupervised_dataset_name {name}: no 'text' column (columns: {ds.column_names})")
    return [t for t in ds["text"] if t and t.strip()]


def missing_source_problem(name: str) -> str | None:
    """The error of a `name` that reads as a local path (a known suffix, or starting with '.', '/' or '~') but
    does not exist, else None (other names that are not files are hub dataset names)."""
    path = Path(name).expanduser()
    if path.exists() or not (path.suffix in TEXT_SUFFIXES or name.startswith((".", "/", "~"))):
        return None
    return (f"--unsupervised_dataset_name {name}: no such file or folder; give a .txt/.jsonl/.json/.parquet file or "
            "a folder with train.*, or a hub dataset name")


def ptx_texts(data: Step3DataArgs, tokenizer: Any) -> list[str]:
    name = data.unsupervised_dataset_name
    path = Path(name).expanduser()
    if path.exists():
        return _local_texts(path, tokenizer)
    problem = missing_source_problem(name)
    if problem:
        raise UserError(problem)
    return _hub_texts(name, data.unsupervised_dataset_config_name, data.preprocessing_num_workers)


def group_blocks(token_lists: list[list[int]], eos_id: int, block_size: int) -> torch.Tensor:
    """(N, block_size): the documents concatenated (eos after each) and cut into full blocks."""
    flat = [t for ids in token_lists for t in ids + [eos_id]]
    n = len(flat) // block_size
    return torch.tensor(flat[:n * block_size], dtype=torch.int64).view(n, block_size)


def load_ptx_data(data: Step3DataArgs, tokenizer: Any, cache_dir: Path, dist: DistInfo) -> PTXDataset:
    block = data.max_prompt_seq_len + data.max_answer_seq_len
    key = digest({"version": CACHE_VERSION, "source": source_fingerprint(data.unsupervised_dataset_name),
                  "config": data.unsupervised_dataset_config_name, "block": block,
                  "tokenizer": tokenizer_fingerprint(tokenizer)})

    def build() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
        texts = ptx_texts(data, tokenizer)
        blocks = group_blocks([tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts],
                              tokenizer.eos_token_id, block)
        if blocks.shape[0] == 0:
            raise UserError(f"--unsupervised_dataset_name {data.unsupervised_dataset_name}: its {len(texts)} "
                            f"documents make no full block of {block} tokens; give more text")
        return {"blocks": blocks}, {"documents": str(len(texts))}

    tensors, meta = cached_tensors(cache_dir / f"ptx_{key}.safetensors", build, dist)
    logger.info("PTX data: %s documents in %d blocks of %d tokens", meta.get("documents"),
                tensors["blocks"].shape[0], block)
    return PTXDataset(tensors["blocks"])


class PTXDataset(torch.utils.data.Dataset):
    def __init__(self, blocks: torch.Tensor):
        self.blocks = blocks

    def __len__(self) -> int:
        return self.blocks.shape[0]

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.blocks[i]


def collate_blocks(batch: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    ids = torch.stack(batch)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
