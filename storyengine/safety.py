"""One gate for text coming in, one for text going out.

In: every text a user hands the engine (a premise, a line, a note, a lore card, a name)
passes `normalize_text`, then `SafetyFilter.clean_input`: lone surrogates (which no
encoder accepts) become U+FFFD, NUL and other control characters go, line ends are
unified, the length is checked with a message that never echoes the text, and control
tokens such as `<|endoftext|>` are removed so user text can never become one.

Out: model text passes `clean_output` (control tokens, the blocklist, mention syntax
defused), a picture's prompt `clean_picture_prompt` (the same, blocked words dropped);
every front end defuses mentions again in whatever it shows, user text
included (`neutralize_mentions`). The bot also sends everything with mentions disabled:
this is the second lock on the same door.
"""

from __future__ import annotations

import re
import unicodedata
from collections.abc import Iterable

from .errors import InvalidInput
from .text import trim_to_sentence

_CONTROL_TOKEN = re.compile(r"<\|[^|<>]{0,40}\|>")
_MASS_MENTION = re.compile(r"@(everyone|here)", re.IGNORECASE)  # even inside a word
_RAW_MENTION = re.compile(r"<(@[!&]?|#|/[^:<>]{0,64}:)(\d+)>")
_ZERO_WIDTH_SPACE = "\u200b"
# C0 and C1 control characters except tab and newline (handled on their own).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")

MAX_NAME_CHARS = 64
"""Longest display name kept (a longer one is cut, not refused: people cannot always
choose the name a platform gives them)."""
MAX_ID_CHARS = 100
ANONYMOUS = "someone"


def normalize_text(text: str) -> str:
    """Text any encoder and database accepts: surrogate pairs joined, lone surrogates
    replaced by U+FFFD, NUL and control characters removed (newlines kept, tabs as
    spaces, CR LF as LF), then NFC."""
    if not isinstance(text, str):
        raise InvalidInput("Expected text.")
    if any("\ud800" <= c <= "\udfff" for c in text):
        text = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
    text = text.replace("\r\n", "\n").replace("\r", "\n").replace("\t", " ")
    return unicodedata.normalize("NFC", _CONTROL.sub("", text))


def clean_name(name: str | None) -> str:
    """A display name fit to store and show: one line, at most MAX_NAME_CHARS."""
    name = " ".join(normalize_text(name or "").split())[:MAX_NAME_CHARS].strip()
    return name or ANONYMOUS


def clean_id(value: object, what: str = "The id") -> str:
    """An identifier (a user, channel, message or community id): non-empty, one line,
    at most MAX_ID_CHARS. Raises `InvalidInput`, never echoing the value."""
    text = normalize_text(str(value)).strip()
    if not text or "\n" in text or len(text) > MAX_ID_CHARS:
        raise InvalidInput(f"{what} must be one line of 1 to {MAX_ID_CHARS} characters.")
    return text


def quoted(text: str, limit: int = 60) -> str:
    """User text echoed inside a message: shortened, quoted, mentions defused."""
    text = " ".join(text.split())
    if len(text) > limit:
        text = text[: limit - 1] + "…"
    return "“" + neutralize_mentions(text) + "”"


_BRACKETED = re.compile(r"\[[^\]\n]*\]?")


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

    def clean_input(
        self,
        text: str | None,
        *,
        what: str = "Your text",
        required: bool = True,
        limit: int | None = None,
    ) -> str:
        """Validate and clean user text (the one gate every user text passes). Raises
        `InvalidInput` with a clear message that states the limit, never the text."""
        text = normalize_text(text or "").strip()
        limit = self.max_input_chars if limit is None else min(limit, self.max_input_chars)
        if len(text) > limit:
            raise InvalidInput(f"{what} is {len(text):,} characters long; the limit is {limit:,}.")
        text = self.strip_control_tokens(text)
        if required and not text:
            raise InvalidInput(f"{what} is empty.")
        return text

    def strip_control_tokens(self, text: str) -> str:
        for token in self.special_tokens:
            text = text.replace(token, " ")
        text = _CONTROL_TOKEN.sub(" ", text)
        return re.sub(r"[ \t]{2,}", " ", text).strip()

    def polish(self, raw: str, *, echo_of: str | None = None) -> str:
        """Turn raw model text into what may be shown: the prompt's echo (`echo_of`) and
        bracketed lines (the prompt's own notation, author's note and lore: a model
        that imitates them is not telling the story) dropped, cut at the last whole
        sentence, and `clean_output`."""
        text = raw.lstrip()
        if echo_of and text.startswith(echo_of.strip()):
            text = text[len(echo_of.strip()) :].lstrip()
        text = _BRACKETED.sub("", text)
        text = re.sub(r"[ \t]{2,}", " ", text)
        text = re.sub(r"\n{3,}", "\n\n", text)
        return self.clean_output(trim_to_sentence(text))

    def clean_output(self, text: str) -> str:
        """Make model text safe to show: control tokens, blocked words, mentions."""
        text = self.strip_control_tokens(normalize_text(text))
        if self._blocked is not None:
            text = self._blocked.sub(lambda m: m.group(0)[0] + "*" * (len(m.group(0)) - 1), text)
        return neutralize_mentions(text)

    def clean_picture_prompt(self, text: str) -> str:
        """A picture's prompt, through the same gate as model text: control tokens go,
        mentions are defused, and a blocked word is dropped whole (a picture cannot
        show half a word masked, as text does)."""
        text = self.strip_control_tokens(normalize_text(text))
        if self._blocked is not None:
            text = self._blocked.sub(" ", text)
        return neutralize_mentions(" ".join(text.split()))


def neutralize_mentions(text: str) -> str:
    """Defuse `@everyone`, `@here` and raw `<@id>`/`<@!id>`/`<@&id>`/`<#id>`/`</cmd:id>`
    mention syntax, so that it shows as text and can never ping, whatever the sender's
    allowed-mentions setting."""
    text = _MASS_MENTION.sub(lambda m: "@" + _ZERO_WIDTH_SPACE + m.group(1), text)
    return _RAW_MENTION.sub(lambda m: "<" + m.group(1) + _ZERO_WIDTH_SPACE + m.group(2) + ">", text)
