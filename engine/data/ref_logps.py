"""The reference model's precomputed answer log-probs (DPO's --precompute_ref_logps), cached beside the
tokenized data: one safetensors file per (data, tokenizer, reference model), written atomically.

Keys "chosen" and "rejected": float32 (num_rows,), the summed answer log-probs of each pair, indexed by the
row's position in its split.
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from engine.data.cache import digest
from engine.runtime.atomic import write_atomically

KEYS = ("chosen", "rejected")


def cache_path(data_fingerprint: str, tokenizer_fingerprint: str, reference_fingerprint: str,
               cache_root: str | Path) -> Path:
    """Where the log-probs of this data, tokenizer and reference live under `cache_root`."""
    key = digest({"data": data_fingerprint, "tokenizer": tokenizer_fingerprint, "reference": reference_fingerprint})
    return Path(cache_root) / f"ref_logps_{key}.safetensors"


def load(path: str | Path) -> dict[str, torch.Tensor] | None:
    """{"chosen", "rejected"} from `path`; None when it is missing or unreadable (then it is recomputed)."""
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError):
        return None
    if any(k not in tensors for k in KEYS) or tensors["chosen"].shape != tensors["rejected"].shape:
        return None
    return {k: tensors[k] for k in KEYS}


def save(path: str | Path, chosen: torch.Tensor, rejected: torch.Tensor, meta: dict[str, str]) -> None:
    """Write the (num_rows,) log-probs atomically: a crash never leaves a partial file at `path`."""
    tensors = {"chosen": chosen.detach().float().cpu().contiguous(),
               "rejected": rejected.detach().float().cpu().contiguous()}
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    metadata = {k: str(v) for k, v in meta.items()}
    write_atomically(Path(path), lambda tmp: save_file(tensors, str(tmp), metadata=metadata), fsync=True)
