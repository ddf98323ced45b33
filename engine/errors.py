"""The one exception type for bad input.

A `UserError` is a problem with what the user gave us (a flag, a file, a folder). Its message names
the problem and the fix. `engine.runtime.entry.run_main` prints it on one line and exits with status 2,
without a traceback.
"""
from __future__ import annotations


class UserError(Exception):
    """Bad input from the user: the message says what is wrong and how to fix it."""
