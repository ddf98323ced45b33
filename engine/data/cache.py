"""The tokenized-data cache every step uses: safetensors (no pickle), keyed by a hash of all that
shapes it, built by rank 0 while the other ranks wait."""
from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from engine.config import DataArgs, Step1DataArgs
from engine.data.sort_task import ASSET_DIR as BUNDLED_DIR
from engine.data.sources import BUNDLED, LOCAL_JSONFILE, LOCAL_JSONFILE_DIR, data_sources
from engine.errors import UserError
from engine.runtime.atomic import write_atomically
from engine.runtime.distributed import DistInfo, all_reduce_sum, barrier

logger = logging.getLogger("engine")

CACHE_VERSION = 2  # bump when any step's tokenisation changes
HASH_LIMIT = 256 * 2**20  # files up to this size are keyed by content, larger ones by size + mtime


def file_fingerprint(f: Path, hash_limit: int = HASH_LIMIT) -> list[Any]:
    """[resolved path, content hash] of a file up to `hash_limit` bytes, else [resolved path, size, mtime]."""
    stat = f.stat()
    if stat.st_size <= hash_limit:
        return [str(f.resolve()), hashlib.sha256(f.read_bytes()).hexdigest()]
    return [str(f.resolve()), stat.st_size, stat.st_mtime_ns]


def source_fingerprint(spec: str) -> Any:
    """The name plus each local file's content hash, so an edited file is re-tokenised."""
    folder = {BUNDLED: BUNDLED_DIR, LOCAL_JSONFILE: LOCAL_JSONFILE_DIR}.get(spec)
    path = folder or Path(spec).expanduser()
    files = sorted(f for f in path.iterdir() if f.is_file()) if path.is_dir() else [path] if path.is_file() else []
    return [spec] + [file_fingerprint(f) for f in files]


def tokenizer_fingerprint(tokenizer: Any) -> str:
    text = json.dumps([sorted(tokenizer.get_vocab().items()), tokenizer.eos_token, tokenizer.pad_token,
                       getattr(tokenizer, "chat_template", None), type(tokenizer).__name__])
    return hashlib.sha256(text.encode()).hexdigest()


def cache_key(data: DataArgs, tokenizer: Any, phase: int, seed: int, extra: dict[str, Any] | None = None) -> str:
    """Hash of everything that shapes a step's tokenized data; `extra` holds step-specific settings."""
    step1 = isinstance(data, Step1DataArgs)  # the step-1-only flags; at their defaults for the other steps
    parts = {
        "extra": extra or {},
        "version": CACHE_VERSION, "phase": phase, "seed": seed,
        "sources": [source_fingerprint(s) for s in data_sources(data.data_path)],
        "sft_only": [source_fingerprint(s) for s in data.sft_only_data_path] if step1 and phase == 1 else [],
        # The split rule joins the key only when not our default, so caches written before the flag stay valid.
        "split": data.data_split if data.data_split_compat == "none" else [data.data_split, data.data_split_compat],
        "max_seq_len": data.max_seq_len, "overlength": data.overlength,
        "train_on_prompt": step1 and data.train_on_prompt,
        "eot": [data.add_eot_token, data.eot_token], "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    return digest(parts)


def digest(parts: dict[str, Any]) -> str:
    """A short, stable hash of JSON-able cache-key parts (the cache file's name)."""
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]


def pack_sequences(seqs: list[list[int]]) -> dict[str, torch.Tensor]:
    """Ragged token lists as one flat tensor plus offsets (row i is ids[offsets[i]:offsets[i+1]])."""
    lengths = torch.tensor([len(s) for s in seqs], dtype=torch.int64)
    return {"input_ids": torch.tensor([t for s in seqs for t in s], dtype=torch.int64),
            "offsets": torch.cat([torch.zeros(1, dtype=torch.int64), lengths.cumsum(0)])}


def sequence_at(ids: torch.Tensor, offsets: torch.Tensor, i: int) -> torch.Tensor:
    return ids[offsets[i]:offsets[i + 1]]


def json_tensor(obj: Any) -> torch.Tensor:
    """A JSON-able object as a uint8 tensor of its UTF-8 JSON text: what is not a tensor (texts, a prompt
    set's columns) stored in the same safetensors file as the tokens, so the two are written atomically
    together and never parsed with pickle."""
    return torch.frombuffer(bytearray(json.dumps(obj).encode("utf-8")), dtype=torch.uint8)


def tensor_json(t: torch.Tensor) -> Any:
    """The object `json_tensor` stored."""
    return json.loads(t.numpy().tobytes().decode("utf-8"))


def split_tensors(tensors: dict[str, torch.Tensor], split: str) -> dict[str, torch.Tensor]:
    """{'train/x': ...} -> {'x': ...} for one split."""
    prefix = split + "/"
    return {k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)}


def _write(path: Path, tensors: dict[str, torch.Tensor], meta: dict[str, str]) -> None:
    """Written atomically and flushed to disk: a crash mid-write never leaves a file at `path` (a later run
    rebuilds), and a failure seen here removes the temp file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=meta), fsync=True)


def _complete(path: Path) -> bool:
    """Whether `path` is a whole safetensors file (its header is checked to cover the file exactly)."""
    if not path.is_file():
        return False
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
    except (SafetensorError, OSError) as err:
        logger.warning("the data cache %s is damaged (%s); rebuilding it", path, err)
        return False
    return True


def _build_and_write(path: Path, build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str]]]) -> str:
    """Build the cache and write it to `path`; the error message when that fails, "" when it worked."""
    try:
        tensors, meta = build()
    except UserError as err:
        return str(err)
    try:
        _write(path, tensors, meta)
    except OSError as err:
        return (f"cannot write the tokenized-data cache {path} ({err.strerror or err}); give --data_output_path a "
                "folder you can write to")
    return ""


def cached_tensors(path: Path, build: Callable[[], tuple[dict[str, torch.Tensor], dict[str, str]]],
                   dist: DistInfo) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of the cache at `path`, which rank 0 builds with `build()` if missing or damaged (and
    each other machine's local rank 0 where the folder is on that machine's own disk).

    Nothing is written when `build` fails, so a refused dataset leaves no cache (and no cache folder)."""
    failed = _build_and_write(path, build) if dist.is_main and not _complete(path) else ""
    # Every rank learns whether rank 0 failed, so none is left waiting at a barrier.
    if all_reduce_sum([float(bool(failed))], dist.device)[0] > 0:
        raise UserError(failed or "rank 0 could not build the dataset; see its error")
    barrier()
    # A cache folder on each machine's own disk: the first rank of every other machine builds its copy (after
    # rank 0, so that on a shared folder nobody builds twice).
    failed = _build_and_write(path, build) if dist.local_rank == 0 and not dist.is_main and not _complete(path) else ""
    if all_reduce_sum([float(bool(failed))], dist.device)[0] > 0:
        raise UserError(failed or "another machine could not build its copy of the dataset cache; see its error")
    barrier()
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        return load_file(str(path)), meta
    except (SafetensorError, OSError) as err:
        raise UserError(f"cannot read the tokenized-data cache {path} ({err}); delete it and run again") from None
