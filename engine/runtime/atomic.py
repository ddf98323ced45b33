"""Safe files: every write that readers must see whole or not at all, and the private cache folder.

A file is written to a temp file beside it and renamed over it; a folder is filled beside its target and
renamed into place. A crash, a kill or a concurrent rank never leaves half of either.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from engine.errors import UserError


def cache_root() -> Path:
    """RLHF_ENGINE_CACHE, else the user's cache folder ($XDG_CACHE_HOME or ~/.cache)/rlhf_engine: never a
    shared, world-writable temp folder, where another user could plant a model for us to load."""
    if os.environ.get("RLHF_ENGINE_CACHE"):
        return Path(os.environ["RLHF_ENGINE_CACHE"]).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME", "")
    base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"  # the XDG spec ignores relative paths
    return base / "rlhf_engine"


def write_cache_folder(target: Path, write: Callable[[Path], None], what: str, fix: str) -> None:
    """Fill a cache folder through `write(tmp)` in a temp folder beside `target`, then rename it to `target`,
    so concurrent ranks and crashes never see half of it. Another process finishing first is not an error;
    any other OSError is a UserError "<what> (<reason>); <fix>"."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".tmp-", dir=target.parent))
    try:
        write(tmp)
        os.rename(tmp, target)
    except OSError as err:
        if not (target / "config.json").is_file():  # a real failure, not another process finishing first
            raise UserError(f"{what} ({err.strerror or err}); {fix}") from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone after the rename; a half-written folder otherwise


def write_atomically(path: Path, data: str | bytes) -> None:
    """Write `data` (text as UTF-8) to a temp file beside `path`, then rename over it: readers never see
    half a file."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode("utf-8") if isinstance(data, str) else data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


# ----------------------------------------------------------------------------------------------
# Atomic Hugging Face folders
# ----------------------------------------------------------------------------------------------
def publish_folder(staging: Path, target: Path) -> None:
    """Move a finished staging folder to `target` so that a crash never leaves a loadable half."""
    if not target.exists():
        os.rename(staging, target)
        return
    (target / "config.json").unlink(missing_ok=True)  # not loadable until the move completes
    files = sorted(p for p in staging.iterdir() if p.name != "config.json")
    for path in files + [staging / "config.json"]:
        dest = target / path.name
        if dest.is_dir() and not path.is_dir():
            shutil.rmtree(dest)
        os.replace(path, dest)
    shutil.rmtree(staging, ignore_errors=True)
