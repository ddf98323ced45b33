"""Step-1 data: tokenise prompt + answer + end token, a pickle-free cache, the dataset and collator.

The cache holds unpadded token ids (padding happens per batch), in safetensors, under a name that is
a hash of everything that shapes it. Rank 0 builds it while the others wait, then all read it.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from engine.config import DataArgs
from engine.data.rows import Row
from engine.data.sources import BUNDLED, LOCAL_JSONFILE, LOCAL_JSONFILE_DIR
from engine.data.split import phase_rows
from engine.distributed import DistInfo, all_reduce_sum, barrier
from engine.errors import UserError
from engine.losses import IGNORE_INDEX
from engine.synthetic import ASSET_DIR as BUNDLED_DIR

logger = logging.getLogger("engine")

CACHE_VERSION = 1  # bump when the tokenisation below changes


@dataclass
class TokenizeStats:
    rows: int = 0
    kept: int = 0
    truncated: int = 0
    dropped_overlength: int = 0
    dropped_no_answer: int = 0


def end_token_id(tokenizer: Any, data: DataArgs) -> int:
    return tokenizer.convert_tokens_to_ids(data.eot_token) if data.add_eot_token else tokenizer.eos_token_id


def tokenize_sft_row(row: Row, tokenizer: Any, max_len: int, end_id: int) -> tuple[list[int], int]:
    """(ids of prompt + chosen + end token, number of prompt tokens), before any length limit.

    The prompt length is that of the prompt tokenised alone; answers start with a space (or a chat
    template's own marker), so the tokeniser does not merge across the boundary.
    """
    prompt_ids = tokenizer(row.prompt)["input_ids"]
    ids = tokenizer(row.prompt + row.chosen)["input_ids"]
    if not ids or ids[-1] != end_id:
        ids = ids + [end_id]
    return ids, min(len(prompt_ids), len(ids))


def tokenize_rows(rows: list[Row], tokenizer: Any, data: DataArgs, end_id: int,
                  stats: TokenizeStats) -> tuple[list[list[int]], list[int]]:
    """Apply --max_seq_len and --overlength; count what was cut or dropped."""
    seqs, prompt_lens = [], []
    for row in rows:
        stats.rows += 1
        ids, n_prompt = tokenize_sft_row(row, tokenizer, data.max_seq_len, end_id)
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


# ----------------------------------------------------------------------------------------------
# Cache
# ----------------------------------------------------------------------------------------------
HASH_LIMIT = 256 * 2**20  # files up to this size are keyed by content, larger ones by size + mtime


def _file_fingerprint(f: Path) -> list[Any]:
    stat = f.stat()
    if stat.st_size <= HASH_LIMIT:
        return [str(f.resolve()), hashlib.sha256(f.read_bytes()).hexdigest()]
    return [str(f.resolve()), stat.st_size, stat.st_mtime_ns]


def _source_fingerprint(spec: str) -> Any:
    """The name plus each local file's content hash, so an edited file is re-tokenised."""
    folder = {BUNDLED: BUNDLED_DIR, LOCAL_JSONFILE: LOCAL_JSONFILE_DIR}.get(spec)
    path = folder or Path(spec).expanduser()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [spec] + [_file_fingerprint(f) for f in files]


def _tokenizer_fingerprint(tokenizer: Any) -> str:
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token, tokenizer.pad_token,
                       getattr(tokenizer, "chat_template", None), type(tokenizer).__name__])
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(data: DataArgs, tokenizer: Any, phase: int, seed: int) -> str:
    parts = {
        "version": CACHE_VERSION, "phase": phase, "seed": seed,
        "sources": [_source_fingerprint(s) for s in data.data_path or [BUNDLED]],
        "sft_only": [_source_fingerprint(s) for s in data.sft_only_data_path] if phase == 1 else [],
        "split": data.data_split, "max_seq_len": data.max_seq_len, "overlength": data.overlength,
        "train_on_prompt": data.train_on_prompt,
        "eot": [data.add_eot_token, data.eot_token], "tokenizer": _tokenizer_fingerprint(tokenizer),
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def _pack(seqs: list[list[int]], prompt_lens: list[int]) -> dict[str, torch.Tensor]:
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    flat = [t for s in seqs for t in s]
    return {"input_ids": torch.tensor(flat, dtype=torch.int64),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)]),
            "prompt_lens": torch.tensor(prompt_lens, dtype=torch.int64)}


def _write_cache(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".tmp-", dir=path.parent)
    os.close(fd)
    save_file(tensors, tmp, metadata=meta)
    os.replace(tmp, path)


def _build_cache(path: Path, data: DataArgs, tokenizer: Any, phase: int, seed: int) -> None:
    train_rows, eval_rows = phase_rows(data, tokenizer, phase, seed)
    end_id = end_token_id(tokenizer, data)
    tensors, meta = {}, {}
    for split, rows in (("train", train_rows), ("eval", eval_rows)):
        stats = TokenizeStats()
        seqs, plens = tokenize_rows(rows, tokenizer, data, end_id, stats)
        if split == "train" and not seqs:
            raise UserError(f"no usable training rows for step {phase} ({asdict(stats)}); check "
                            "--data_path, --data_split and --max_seq_len")
        tensors.update({f"{split}/{k}": v for k, v in _pack(seqs, plens).items()})
        meta[f"{split}_stats"] = json.dumps(asdict(stats))
    _write_cache(path, tensors, meta)


def _log_stats(meta: dict[str, str], max_len: int, overlength: str) -> None:
    for split in ("train", "eval"):
        s = json.loads(meta[f"{split}_stats"])
        logger.info("%s data: %d rows, %d kept", split, s["rows"], s["kept"])
        if s["truncated"] or s["dropped_overlength"] or s["dropped_no_answer"]:
            logger.warning("%s data: %d rows over --max_seq_len %d were %s; %d dropped because the prompt "
                           "alone filled the limit", split, s["truncated"] + s["dropped_overlength"],
                           max_len, "truncated" if overlength == "truncate" else "dropped",
                           s["dropped_no_answer"])


def load_sft_data(data: DataArgs, tokenizer: Any, cache_dir: Path, seed: int, dist: DistInfo
                  ) -> tuple["SFTDataset", "SFTDataset"]:
    """Build (rank 0) or reuse the cache, then load it on every rank."""
    path = cache_dir / f"sft_{cache_key(data, tokenizer, 1, seed)}.safetensors"
    failed = ""
    if dist.is_main and not path.is_file():
        logger.info("tokenizing step-1 data into %s", path)
        try:
            _build_cache(path, data, tokenizer, 1, seed)
        except UserError as err:
            failed = str(err)
    # Every rank learns whether rank 0 failed, so none is left waiting at a barrier.
    if all_reduce_sum([float(bool(failed))], dist.device)[0] > 0:
        raise UserError(failed or "rank 0 could not build the dataset; see its error")
    barrier()
    tensors = load_file(str(path))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    _log_stats(meta, data.max_seq_len, data.overlength)
    return tuple(SFTDataset({k.split("/", 1)[1]: v for k, v in tensors.items() if k.startswith(split)},
                            data.train_on_prompt) for split in ("train/", "eval/"))


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
        ids = self.ids[self.offsets[i]:self.offsets[i + 1]]
        labels = ids.clone()
        if not self.train_on_prompt:
            labels[:self.prompt_lens[i]] = IGNORE_INDEX
        return {"input_ids": ids, "labels": labels}


def collate_right_padded(batch: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest row: input_ids (B, T), attention_mask (B, T), labels (B, T) (-100 on pad)."""
    width = max(len(b["input_ids"]) for b in batch)
    input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    for i, b in enumerate(batch):
        n = len(b["input_ids"])
        input_ids[i, :n], labels[i, :n], mask[i, :n] = b["input_ids"], b["labels"], 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}
