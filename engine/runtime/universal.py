"""Elastic resume: a checkpoint written by N ranks, made loadable by any number of ranks.

DeepSpeed's ZeRO checkpoints hold each rank's flat shard of the fp32 weights and Adam moments, cut for the
world size that wrote them. `deepspeed.checkpoint.ds_to_universal` merges them into DeepSpeed's *universal*
format: one folder per parameter with its fp32 weights, `exp_avg` and `exp_avg_sq`, plus the optimizer's
common state; an engine whose config has `"checkpoint": {"load_universal": true}` cuts them again for its own
world size (`engine.runtime.ds_private.universal_loading`). ZeRO stages 1, 2 and 3 and DeepSpeed's bf16
optimizer keep per-rank shards and are converted; a plain fp32 or fp16 engine without ZeRO saves whole
tensors (`mp_rank_00_model_states.pt`), which any world size loads as they are.

The conversion writes `<role>/<tag>/universal/` beside each role's DeepSpeed files, each role's folder built
in a staging folder and renamed into place, then seals it with `<tag>/universal.json` (every file and its
size), so a conversion cut short is redone, and one that finished is reused. `--resume` runs it when the
world size differs; ahead of time (e.g. on a login node, before a job with another GPU count starts):

    python -m engine.runtime.reshard --output_dir output/step1_sft

converts the newest complete checkpoint in that folder (`engine.runtime.reshard`, the command).
"""
from __future__ import annotations

import contextlib
import io
import json
import logging
from argparse import Namespace
from collections.abc import Sequence
from pathlib import Path

from engine.errors import UserError
from engine.runtime.atomic import publish_folder, remove_folder, write_atomically

logger = logging.getLogger("engine")

UNIVERSAL_DIR = "universal"            # <role>/<tag>/universal/: what `load_universal` reads (tag "universal")
UNIVERSAL_MANIFEST = "universal.json"  # <tag>/universal.json: the seal of the conversion
SHARDED_FILES = ("*optim_states.pt",)  # per-rank ZeRO / bf16-optimizer shards: their presence needs conversion


def role_folders(folder: Path, tag: str, roles: Sequence[str]) -> list[Path]:
    """The DeepSpeed folder of checkpoint `tag` of each role ('' is the single engine of steps 1 and 2)."""
    return [folder / role / tag for role in roles]


def is_sharded(role_folder: Path) -> bool:
    """Whether a role's DeepSpeed checkpoint holds per-rank optimizer shards (ZeRO 1-3, the bf16 optimizer)."""
    return any(any(role_folder.glob(pattern)) for pattern in SHARDED_FILES)


def universal_problem(folder: Path, tag: str) -> str | None:
    """Why checkpoint `tag` has no usable universal copy, or None when it has one."""
    path = folder / tag / UNIVERSAL_MANIFEST
    if not path.is_file():
        return "not converted"
    try:
        files = json.loads(path.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{path} is damaged"
    for name, size in files.items():
        f = folder / name
        if not f.is_file() or f.stat().st_size != size:
            return f"{f} is missing or truncated"
    return None


def remove_universal(folder: Path, tag: str, roles: Sequence[str]) -> None:
    """Unseal and delete the universal copy of `tag` (before `tag` is re-written)."""
    (folder / tag / UNIVERSAL_MANIFEST).unlink(missing_ok=True)
    for role_folder in role_folders(folder, tag, roles):
        for path in (role_folder / UNIVERSAL_DIR, role_folder / f"{UNIVERSAL_DIR}.tmp"):
            if path.is_dir():
                remove_folder(path)
        (role_folder / "latest_universal").unlink(missing_ok=True)


def ensure_universal(folder: Path, tag: str, roles: Sequence[str], saved_world: int, workers: int = 1) -> None:
    """Convert checkpoint `tag` under `folder` (ds_checkpoint/) to the universal format, once: a sealed
    conversion is reused. Roles without per-rank shards are left as they are. A UserError, naming DeepSpeed's
    reason and the rank count that resumes without conversion, when DeepSpeed cannot convert it. `workers`:
    processes that extract shards (more than 1 forks, which a training process should not do)."""
    if universal_problem(folder, tag) is None:
        return
    remove_universal(folder, tag, roles)
    logger.info("--resume: converting checkpoint %s (written by %d ranks) to DeepSpeed's universal format, once, "
                "so that another number of ranks can load it", folder / tag, saved_world)
    for role_folder in role_folders(folder, tag, roles):
        if is_sharded(role_folder):
            _convert(role_folder, saved_world, workers)
    files = {str(p.relative_to(folder)): p.stat().st_size
             for role_folder in role_folders(folder, tag, roles) if (role_folder / UNIVERSAL_DIR).is_dir()
             for p in sorted((role_folder / UNIVERSAL_DIR).rglob("*")) if p.is_file()}
    write_atomically(folder / tag / UNIVERSAL_MANIFEST, json.dumps({"tag": tag, "files": files}, indent=1) + "\n")


def _convert(role_folder: Path, saved_world: int, workers: int) -> None:
    """`ds_to_universal` of one role's folder into a staging folder, renamed to `universal/` when complete."""
    from deepspeed.checkpoint import ds_to_universal

    from engine.runtime.ds_private import safe_torch_load

    staging = role_folder / f"{UNIVERSAL_DIR}.tmp"
    args = Namespace(input_folder=str(role_folder), output_folder=str(staging), num_extract_workers=workers,
                     num_merge_workers=max(1, workers // 2), keep_temp_folder=False, strict=True,
                     # ZeRO 1/2 checkpoints lack the `universal_checkpoint_info` Megatron-DeepSpeed adds; without
                     # tensor or pipeline parallelism DeepSpeed's default (its format version only) is all of it.
                     inject_missing_state=True)
    chatter = io.StringIO()  # its progress bars and prints, kept off the console
    try:
        with safe_torch_load(), contextlib.redirect_stdout(chatter), contextlib.redirect_stderr(chatter):
            ds_to_universal.main(args)
    except Exception as e:  # DeepSpeed raises plain asserts and RuntimeErrors for what it cannot convert
        raise UserError(f"--resume: DeepSpeed cannot convert {role_folder} to its universal format "
                        f"({type(e).__name__}: {e}); resume with the {saved_world} ranks that wrote it") from e
    finally:
        (role_folder / "latest_universal").unlink(missing_ok=True)  # ds_to_universal's pointer to the staging folder
    publish_folder(staging, role_folder / UNIVERSAL_DIR, model=False)
