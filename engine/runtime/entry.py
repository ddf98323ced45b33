"""The entry-point wrapper of every script: a UserError becomes one line and exit status 2, no traceback.

Any other exception is a bug in the engine and keeps its traceback, unless it comes from a collective
that broke because a peer rank died, failed or became unreachable: then the one line names that rank (exit 1),
once the watchdog can tell (at most --peer_timeout after the collective broke). Either way
the other ranks hear of it through the peer watchdog (engine/runtime/watchdog.py) and stop too.
"""
from __future__ import annotations

import sys
from collections.abc import Callable, Sequence

from engine.errors import UserError
from engine.observe import startup
from engine.runtime import watchdog


def run_main(main: Callable[[Sequence[str] | None], object], argv: Sequence[str] | None = None) -> None:
    """Call `main(argv)`; a UserError becomes `error: <message>` on stderr and exit status 2."""
    startup.launched()  # the step's start-up time counts from the process's start
    try:
        main(argv)
    except UserError as err:
        print(f"error: {err}", file=sys.stderr, flush=True)
        watchdog.fail(2, str(err))
        # Other ranks may be waiting in a collective for this one; exit hard so they are torn down
        # by the launcher, or by their watchdog, instead of hanging.
        sys.exit(2)
    except SystemExit as err:
        if err.code not in (0, None):
            watchdog.fail(1, f"SystemExit: {err.code}")
        else:
            watchdog.finish()
        raise
    except BaseException as err:
        # A collective raises ("Connection reset by peer") when a peer vanished, often before the watchdog can
        # tell why: wait for its verdict and name the peer instead, the same line whichever noticed first.
        wait = isinstance(err, Exception) and watchdog.collective_error(err)
        peer = watchdog.peer_failure(wait=wait) if isinstance(err, Exception) else None
        if peer is not None:
            watchdog.stop_process(*peer)
        watchdog.fail(1, watchdog.one_line(err))
        raise
    finally:
        startup.end()  # stop timing imports (a run that failed before its first step never reported)
    watchdog.finish()
