"""User-facing errors and the entry-point wrapper that turns them into a clean exit.

A `UserError` is a problem with what the user gave us (a flag, a file, a folder). Its message names
the problem and the fix. `run_main` prints it on one line and exits with status 2, without a
traceback; any other exception is a bug in the engine and keeps its traceback.
"""
from __future__ import annotations

import logging
import sys
from typing import Callable, Sequence

logger = logging.getLogger("engine")


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        # Other ranks may be waiting in a collective for this one; exit hard so they are torn down
        # by the launcher instead of hanging.
        sys.exit(2)
