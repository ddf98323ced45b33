"""The cache of precomputed reference log-probs (`--precompute_ref_logps`): one pass of the reference over
the training pairs before training, after which no reference model is held in memory.

One safetensors file beside the tokenized data, keyed by the data, the tokenizer and the reference model
(a change to any of them is a new file, never a stale hit). It holds two float32 vectors, "chosen" and
"rejected", of shape [num_rows], indexed by the row's position in the training split: the reference's
summed log-prob of each row's chosen and rejected answer. Rank 0 writes it atomically (temp file and
rename, `engine.runtime.atomic`); `load` returns a whole, checked cache or None, never half of one.
"""
from __future__ import annotations

import hashlib
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from engine.data.cache import HASH_LIMIT, digest, file_fingerprint
from engine.errors import UserError
from engine.runtime.atomic import write_atomically

logger = logging.getLogger("engine")

FORMAT = "ref_logps"
FORMAT_VERSION = 1  # bump when what the vectors hold changes (e.g. sum vs mean of the answer's log-probs)
KEYS = ("chosen", "rejected")
# What of a model folder shapes its outputs: the config and the weights (a peft folder's adapter too).
MODEL_FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
MODEL_FILE_NAMES = ("config.json", "adapter_config.json")


def cache_path(data_fingerprint: str, tokenizer_fingerprint: str, reference_fingerprint: str,
               cache_root: str | os.PathLike) -> Path:
    """The cache file for this data, tokenizer and reference model, in `cache_root` (the tokenized-data
    cache folder). Each fingerprint is any string that changes when its input does; fold settings that
    change the log-probs (dtype, quantization, --max_seq_len) into the data or reference one."""
    parts = {"data": data_fingerprint, "tokenizer": tokenizer_fingerprint, "reference": reference_fingerprint}
    empty = [name for name, value in parts.items() if not value]
    if empty:
        raise ValueError(f"empty fingerprint: {', '.join(empty)}")
    return Path(cache_root) / f"{FORMAT}_{digest(parts | {'version': FORMAT_VERSION})}.safetensors"


def fingerprint_model_folder(path: str | os.PathLike) -> str:
    """A cheap fingerprint of a model folder (or a hub name in the local Hugging Face cache): its config and
    weight files, each by content hash while the folder's weights total at most HASH_LIMIT bytes, else by
    resolved path, size and mtime (a 7B folder is not read)."""
    folder = _model_folder(str(path))
    files = sorted(f for f in folder.iterdir() if f.is_file() and _shapes_outputs(f.name))
    if not any(f.name == "config.json" for f in files):
        raise UserError(f"{folder} has no config.json; give a Hugging Face model folder as the reference model")
    total = sum(f.stat().st_size for f in files)
    limit = HASH_LIMIT if total <= HASH_LIMIT else 0
    return digest({"files": [[f.name, *file_fingerprint(f, limit if f.suffix != ".json" else HASH_LIMIT)]
                             for f in files]})


def _shapes_outputs(name: str) -> bool:
    return name in MODEL_FILE_NAMES or name.endswith(MODEL_FILE_SUFFIXES) or name.endswith(".index.json")


def _model_folder(name: str) -> Path:
    """A local folder, or the snapshot folder of a hub name already in the Hugging Face cache."""
    folder = Path(name).expanduser()
    if folder.is_dir():
        return folder
    from huggingface_hub import try_to_load_from_cache

    try:
        cached = try_to_load_from_cache(name, "config.json")
    except ValueError:  # not a valid hub name either
        cached = None
    if isinstance(cached, str):
        return Path(cached).parent
    raise UserError(f"the reference model {name!r} is neither a folder nor in the Hugging Face cache; give a model "
                    "folder (a step's --output_dir) or load the hub model once first")


def save(path: str | os.PathLike, chosen: torch.Tensor, rejected: torch.Tensor, meta: dict[str, str]) -> None:
    """Write the cache at `path` (rank 0 only; every other rank returns at once, so call it on all ranks and
    let them wait at a barrier after). chosen, rejected: (num_rows,) reference log-probs of the training
    split's rows, in row order. `meta`: strings saved in the file's header (what built it)."""
    if _rank() != 0:
        return
    if chosen.dim() != 1 or chosen.shape != rejected.shape:
        raise ValueError(f"chosen and rejected must be 1-D of one length, not {tuple(chosen.shape)} and "
                         f"{tuple(rejected.shape)}")
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise TypeError("meta must map strings to strings (safetensors metadata)")
    tensors = {k: t.detach().to("cpu", torch.float32).contiguous() for k, t in zip(KEYS, (chosen, rejected))}
    header = dict(meta) | {"format": FORMAT, "version": str(FORMAT_VERSION), "num_rows": str(chosen.numel()),
                           "sha256": _checksum(tensors)}
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomically(path, lambda tmp: save_file(tensors, str(tmp), metadata=header), fsync=True)
    except OSError as err:
        raise UserError(f"cannot write the reference log-probs cache {path} ({err.strerror or err}); give "
                        "--data_output_path a folder you can write to") from None
    logger.info("reference log-probs of %d pairs cached in %s", chosen.numel(), path)


def load(path: str | os.PathLike, num_rows: int | None = None) -> dict[str, torch.Tensor] | None:
    """{"chosen", "rejected"}: (num_rows,) float32 of the cache at `path`; None when there is no file, or it
    is truncated, damaged (checksum), of another format, or (given `num_rows`) of another length. A damaged
    file is logged and left for `save` to replace."""
    path = Path(path)
    if not path.is_file():
        return None
    try:
        with safe_open(str(path), framework="pt") as f:
            header = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, RuntimeError) as err:
        logger.warning("the reference log-probs cache %s is unreadable (%s); recomputing it", path, err)
        return None
    why = _problem(tensors, header, num_rows)
    if why:
        logger.warning("the reference log-probs cache %s is not usable (%s); recomputing it", path, why)
        return None
    return {k: tensors[k] for k in KEYS}


def _problem(tensors: dict[str, torch.Tensor], header: dict[str, str], num_rows: int | None) -> str:
    """Why a read cache cannot be used ("" when it can)."""
    if header.get("format") != FORMAT or header.get("version") != str(FORMAT_VERSION):
        return f"format {header.get('format')!r} version {header.get('version')!r}"
    if sorted(tensors) != sorted(KEYS):
        return f"tensors {sorted(tensors)}"
    rows = header.get("num_rows", "")
    if not rows.isdigit() or any(t.dtype != torch.float32 or t.shape != (int(rows),) for t in tensors.values()):
        return "shapes or dtypes differ from its header"
    if header.get("sha256") != _checksum(tensors):
        return "checksum mismatch"
    if num_rows is not None and int(rows) != num_rows:
        return f"{rows} rows, the training split has {num_rows}"
    return ""


def _checksum(tensors: dict[str, Any]) -> str:
    h = hashlib.sha256()
    for k in KEYS:
        h.update(tensors[k].numpy().tobytes())
    return h.hexdigest()


def _rank() -> int:
    """This process's global rank: torch.distributed's once initialised, else the launcher's RANK."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", "0"))
