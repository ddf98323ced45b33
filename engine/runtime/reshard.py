"""`python -m engine.runtime.reshard --output_dir <a step's output folder>`: convert its newest complete checkpoint
to DeepSpeed's universal format ahead of time (e.g. on a login node, before a job with another GPU count starts),
so that `--resume` with any number of ranks loads it without converting (`engine.runtime.universal`)."""
from __future__ import annotations

import argparse
import json
import logging
from collections.abc import Sequence
from pathlib import Path

from engine.errors import UserError
from engine.runtime.checkpoint import MANIFEST, find_resume_checkpoint
from engine.runtime.universal import ensure_universal

logger = logging.getLogger("engine")


def convert_newest(output_dir: Path, workers: int = 1) -> Path:
    """Convert the newest complete checkpoint of a step's `output_dir`; returns its tag folder."""
    tag_folder = find_resume_checkpoint(output_dir)
    manifest = json.loads((tag_folder / MANIFEST).read_text())
    ensure_universal(tag_folder.parent, tag_folder.name, manifest["roles"], manifest["world_size"], workers)
    return tag_folder


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m engine.runtime.reshard", description=__doc__.split("\n")[0])
    parser.add_argument("--output_dir", required=True, help="the step's --output_dir (holds ds_checkpoint/)")
    parser.add_argument("--workers", type=int, default=4, help="processes extracting the shards in parallel")
    args = parser.parse_args(argv)
    if args.workers < 1:
        raise UserError(f"--workers must be >= 1 (got {args.workers})")
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    tag_folder = convert_newest(Path(args.output_dir).expanduser(), args.workers)
    logger.info("%s can now be resumed with any number of ranks (--resume)", tag_folder)


if __name__ == "__main__":
    from engine.runtime.entry import run_main

    run_main(main)
