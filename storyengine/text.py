"""Plain-text helpers: sentence boundaries and message splitting."""

from __future__ import annotations

import re

_ABBREVIATIONS = ("Mr.", "Mrs.", "Ms.", "Dr.", "St.", "Mt.", "Jr.", "Sr.", "vs.", "e.g.", "i.e.")
# A sentence ends at . ! ? (or an ellipsis), optionally followed by closing quotes or
# brackets, and then whitespace or the end of the text.
_SENTENCE_END = re.compile(r"(?:[.!?]+|…)[\"'”’»)\]]*(?=\s|$)")


def _sentence_ends(text: str) -> list[int]:
    ends = []
    for match in _SENTENCE_END.finditer(text):
        if text[: match.end()].endswith(_ABBREVIATIONS):
            continue
        ends.append(match.end())
    return ends


def trim_to_sentence(text: str) -> str:
    """Cut `text` after its last complete sentence.

    With no sentence end at all, cut after the last whole word (a word followed by
    whitespace), so the result never ends mid-word. Returns "" when nothing is left.
    """
    text = text.rstrip()
    ends = _sentence_ends(text)
    if ends:
        return text[: ends[-1]].strip()
    # No sentence end: keep whole words only. The final word may be cut short by the
    # token limit, so it goes unless the text clearly ended there.
    cut = max(text.rfind(" "), text.rfind("\n"))
    return text[:cut].strip() if cut > 0 else ""


def split_sentences(text: str) -> list[str]:
    """Split `text` into sentences (keeping their punctuation)."""
    sentences, start = [], 0
    for end in _sentence_ends(text):
        piece = text[start:end].strip()
        if piece:
            sentences.append(piece)
        start = end
    tail = text[start:].strip()
    if tail:
        sentences.append(tail)
    return sentences


def split_message(text: str, limit: int = 2000) -> list[str]:
    """Split `text` into chunks of at most `limit` characters, at sentence boundaries
    where possible, then at line or word boundaries, and as a last resort mid-word."""
    if limit < 1:
        raise ValueError("limit must be positive")
    chunks: list[str] = []
    rest = text.strip()
    while len(rest) > limit:
        window = rest[:limit]
        cut = max((e for e in _sentence_ends(window) if e > limit // 4), default=-1)
        if cut <= 0:
            cut = max(window.rfind("\n"), window.rfind(" "))
        if cut <= 0:
            cut = limit
        chunks.append(rest[:cut].strip())
        rest = rest[cut:].strip()
    if rest:
        chunks.append(rest)
    return chunks
