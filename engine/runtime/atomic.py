"""Safe files: every write that readers must see whole or not at all, and the private cache folder.

Every temp-and-rename in the engine goes through this module. The temp file or folder is made beside its
target (the same file system, so the rename is atomic) and removed whatever happens. What is published gets
the modes a plain `open()` or `mkdir()` would give (0666 and 0777 less the process umask), not the private
0600 and 0700 of `mkstemp` and `mkdtemp`, which a rename keeps: a teammate, a web server or a container with
another uid can read the outputs whenever the umask lets them.

- `write_atomically`: one file, written to a temp file and renamed over `path`.
- `publish_folder`: a finished staging folder becomes an output the user asked for (a model folder, the
  report). The newest write wins: an existing folder is replaced (a model folder in place, file by file,
  `config.json` last so it is never loadable half-written; other folders whole).
- `write_cache_folder`: a private cache entry (the tiny model, the benchmark models). The first writer
  wins: a concurrent rank or process that finished first is success, not an error, and the entry is never
  replaced.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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


def process_umask() -> int:
    """The process umask. Linux shows it in /proc/self/status; elsewhere it is read by setting it, briefly, to
    the private 077 (a file another thread creates meanwhile is then private, never too open)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o077)
    os.umask(mask)
    return mask


def apply_umask(root: Path) -> None:
    """Give `root` and everything under it the modes of a plain `mkdir()` / `open()`: folders (and files with an
    owner execute bit, e.g. a copied script) 0777 less the umask, other files 0666 less the umask."""
    mask = process_umask()
    for path in [root, *root.rglob("*")]:
        if path.is_symlink():
            continue
        executable = path.is_dir() or path.stat().st_mode & 0o100
        os.chmod(path, (0o777 if executable else 0o666) & ~mask)


def write_atomically(path: Path, data: str | bytes | Callable[[Path], None], *, fsync: bool = False) -> None:
    """Write `data` (text as UTF-8; or a function that writes the file at the path it is given, such as
    safetensors' `save_file`) to a temp file beside `path`, then rename it over `path`: readers never see
    half a file. `fsync` flushes it to disk first, so a machine crash cannot leave a renamed empty file."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            if not callable(data):
                f.write(data.encode("utf-8") if isinstance(data, str) else data)
        if callable(data):
            data(Path(tmp))
        if fsync:
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~process_umask())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def staging_folder(target: Path) -> Iterator[Path]:
    """A fresh temp folder beside `target` to build it in; removed on exit (gone already once published)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.staging-", dir=target.parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def write_cache_folder(target: Path, write: Callable[[Path], None], what: str, fix: str) -> None:
    """Fill a cache folder through `write(staging)`, then rename it to `target` (first writer wins, see the
    module docstring). Any OSError but another process finishing first is a UserError "<what> (<reason>); <fix>"."""
    with staging_folder(target) as staging:
        try:
            write(staging)
            os.rename(staging, target)
        except OSError as err:
            if not (target / "config.json").is_file():  # a real failure, not another process finishing first
                raise UserError(f"{what} ({err.strerror or err}); {fix}") from None


def publish_folder(staging: Path, target: Path, *, model: bool = True) -> None:
    """Move a finished staging folder to `target` (newest wins, see the module docstring). A `model` folder
    is replaced file by file with `config.json` last, so a crash never leaves a loadable half and files of
    the user's own in it stay; any other folder is replaced whole."""
    apply_umask(staging)
    if not target.exists():
        os.rename(staging, target)
        return
    if not model:
        remove_folder(target, then=lambda: os.rename(staging, target))
        return
    (target / "config.json").unlink(missing_ok=True)  # not loadable until the move completes
    files = sorted(p for p in staging.iterdir() if p.name != "config.json")
    for path in files + [staging / "config.json"]:
        dest = target / path.name
        if dest.is_dir() and not path.is_dir():
            shutil.rmtree(dest)
        os.replace(path, dest)
    shutil.rmtree(staging, ignore_errors=True)


def remove_folder(path: Path, then: Callable[[], None] | None = None) -> None:
    """Rename `path` out of the way (`.deleting-<name>`), call `then()`, and delete it: readers see the
    folder whole or not at all, and a crash mid-delete leaves only a dot-folder no reader picks up."""
    trash = path.with_name(f".deleting-{path.name}")
    shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    if then is not None:
        then()
    shutil.rmtree(trash, ignore_errors=True)
