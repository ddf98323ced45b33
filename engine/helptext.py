"""How every script's `--help` reads: one formatter, and one way to show a default.

A default is shown as a user would type or read it (`on`/`off`, `none`, not `False`, `[]`, `None`), and
only where the help text does not already say what the default is ("Default: the built-in tiny
model"): the text says it better than a raw `None`.
"""
from __future__ import annotations

import argparse
import re
from typing import Any

# A help text that contains this names its default itself.
_NAMES_DEFAULT = re.compile(r"\bdefault:", re.IGNORECASE)


def show_default(value: Any) -> str:
    """A default as the command line spells it: on/off, space-separated lists, none, empty."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "on" if value else "off"
    if isinstance(value, (list, tuple)):
        return " ".join(map(show_default, value)) or "none"
    if value == "":
        return "empty"
    return str(value)


def names_default(help_text: str) -> bool:
    return bool(_NAMES_DEFAULT.search(help_text))


def default_note(help_text: str, value: Any) -> str:
    """" (default: ...)" to append to `help_text`; empty where the text names its default itself or there
    is no value to show (None, "")."""
    if names_default(help_text) or value is None or value is argparse.SUPPRESS or value == "":
        return ""
    return f" (default: {show_default(value)})"


# Option names whose string value is a file, folder or model (`--data_path`, `--output_dir`, `--reward_model`).
_PATH_NAMES = ("path", "dir", "model", "config", "reference")


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """The description as written (its examples keep their backslash continuations), each option's
    spellings with one short placeholder (`--output-dir, --output_dir PATH`, not the name again in
    capitals), and the default where the help text does not name it."""

    def __init__(self, prog: str, **kwargs: Any) -> None:
        kwargs.setdefault("max_help_position", 30)
        super().__init__(prog, **kwargs)

    def _get_default_metavar_for_optional(self, action: argparse.Action) -> str:
        if action.type is int:
            return "N"
        if action.type is float:
            return "X"
        return "PATH" if action.dest.endswith(_PATH_NAMES) else "TEXT"

    def _format_action_invocation(self, action: argparse.Action) -> str:
        if not action.option_strings or action.nargs == 0:
            return super()._format_action_invocation(action)
        metavar = self._format_args(action, self._get_default_metavar_for_optional(action))
        return f"{', '.join(action.option_strings)} {metavar}"

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        # A switch that is off unless given gains nothing from "(default: off)".
        if action.nargs == 0 and action.default is False:
            return text
        return text + default_note(text, action.default).replace("%", "%%")
