"""Records every warning a Python process shows, when RLHF_WARNING_PROBE names a folder (tests only).

Put this folder first on PYTHONPATH: Python imports `sitecustomize` at start-up in every process, so the
probe also sees the DeepSpeed launcher and each rank it starts. A "warning" is
- a Python warning that the warnings filters let through (what `warnings.showwarning` is called for), and
- a log record at WARNING or above that reaches a handler, from any logger (third-party loggers with
  their own handlers included: the hook is `Logger.callHandlers`, which every handled record passes).
Each one is appended as a JSON line to <folder>/<pid>.jsonl at once, so a killed process keeps its
records. `tests/helpers/console_warnings.py` reads them back.
"""
from __future__ import annotations

import json
import logging
import os
import warnings

_FOLDER = os.environ.get("RLHF_WARNING_PROBE")


def _record(kind: str, source: str, message: str) -> None:
    line = json.dumps({"kind": kind, "source": source, "message": message.strip().splitlines()[0][:300]
                       if message.strip() else ""})
    with open(os.path.join(_FOLDER, f"{os.getpid()}.jsonl"), "a", encoding="utf-8") as f:
        f.write(line + "\n")


def _install() -> None:
    show = warnings.showwarning

    def showwarning(message, category, filename, lineno, file=None, line=None):
        _record("warning", f"{category.__name__} {filename}:{lineno}", str(message))
        return show(message, category, filename, lineno, file, line)

    warnings.showwarning = showwarning
    call_handlers = logging.Logger.callHandlers

    def callHandlers(self, record):  # noqa: N802 (logging's name)
        if record.levelno >= logging.WARNING:
            try:
                text = record.getMessage()
            except Exception:  # a bad format string is still a warning
                text = str(record.msg)
            _record("log", f"{record.levelname} {record.name}", text)
        return call_handlers(self, record)

    logging.Logger.callHandlers = callHandlers


if _FOLDER:
    _install()
