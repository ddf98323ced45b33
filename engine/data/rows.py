"""The one row type every data source is normalised to."""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Row:
    """A prompt with its preferred answer and, for preference data, the rejected one.

    `prompt` ends where the model's answer starts (e.g. "... Assistant:"), and answers carry their own
    leading space, so `prompt + chosen` is the full text of the conversation.
    """

    prompt: str
    chosen: str
    rejected: str | None = None
