"""Input limits and output filtering.

User text is cleaned before it reaches the model (length limit, control tokens removed);
model text is cleaned before anyone sees it (blocklist, mentions neutralised). The bot
also sends everything with mentions disabled; this is the second lock on the same door.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .errors import InvalidInput

_CONTROL_TOKEN = re.compile(r"<\|[^|<>]{0,40}\|>")
_MASS_MENTION = re.compile(r"@(everyone|here)\b", re.IGNORECASE)
_RAW_MENTION = re.compile(r"<(@[!&]?|#)(\d+)>")
_ZERO_WIDTH_SPACE = "\u200b"


class SafetyFilter:
    def __init__(
        self,
        *,
        max_input_chars: int = 1000,
        blocklist: Iterable[str] = (),
        special_tokens: Iterable[str] = (),
    ) -> None:
        self.max_input_chars = max_input_chars
        self.special_tokens = tuple(t for t in special_tokens if t)
        words = sorted({w.strip().lower() for w in blocklist if w.strip()}, key=len, reverse=True)
        self._blocked = (
            re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)
            if words
            else None
        )

    def clean_input(self, text: str, *, what: str = "Your text", required: bool = True) -> str:
        """Validate and clean user text. Raises `InvalidInput` with a clear message."""
        text = (text or "").replace("\r\n", "\n").strip()
        if len(text) > self.max_input_chars:
            raise InvalidInput(
                f"{what} is {len(text)} characters long; the limit is {self.max_input_chars}."
            )
        text = self.strip_control_tokens(text)
        if required and not text:
            raise InvalidInput(f"{what} is empty.")
        return text

    def strip_control_tokens(self, text: str) -> str:
        for token in self.special_tokens:
            text = text.replace(token, " ")
        text = _CONTROL_TOKEN.sub(" ", text)
        return re.sub(r"[ \t]{2,}", " ", text).strip()

    def clean_output(self, text: str) -> str:
        """Make model text safe to show: control tokens, blocked words, mentions."""
        text = self.strip_control_tokens(text)
        if self._blocked is not None:
            text = self._blocked.sub(lambda m: m.group(0)[0] + "*" * (len(m.group(0)) - 1), text)
        return neutralize_mentions(text)


def neutralize_mentions(text: str) -> str:
    """Defuse `@everyone`, `@here` and raw `<@id>`/`<@&id>`/`<#id>` mention syntax."""
    text = _MASS_MENTION.sub(lambda m: "@" + _ZERO_WIDTH_SPACE + m.group(1), text)
    return _RAW_MENTION.sub(lambda m: "<" + m.group(1) + _ZERO_WIDTH_SPACE + m.group(2) + ">", text)
