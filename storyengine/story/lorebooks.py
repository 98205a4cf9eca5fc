"""Lore in and out, in the formats people already have: SillyTavern character cards (V2,
as JSON or inside a PNG's `chara` text chunk) and world info, NovelAI lorebooks.

`read` turns a file into `ImportedLore` (cards, and for a character card the memory its
personality and scenario make) or raises `InvalidInput` saying which field is wrong and
what was expected; unknown fields are ignored. Taleweaver's cards are short (a name, up
to ten trigger words, 400 characters), so longer entries are cut at a sentence end and
the report says how many. `world_info` writes a story's lore as SillyTavern world info.
"""

from __future__ import annotations

import base64
import binascii
import json
import struct
import zlib
from dataclasses import dataclass, field
from typing import Any

from ..config import MAX_LORE_NAME, MAX_NOTE_CHARS, MAX_TRIGGER_CHARS, MAX_TRIGGERS
from ..errors import InvalidInput
from ..records import LoreCard
from ..text import split_sentences

MAX_BYTES = 5_000_000
MAX_ENTRIES = 500
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


@dataclass
class ImportedLore:
    kind: str
    """What the file was: "character card", "world info" or "NovelAI lorebook"."""
    cards: list[LoreCard] = field(default_factory=list)
    memory: str = ""
    """A character card's personality and scenario, for the story's memory."""
    character: str = ""
    """A character card's name."""
    scenario: str = ""
    greeting: str = ""
    """A character card's `first_mes`: the opening of a story started from the card."""
    shortened: int = 0
    """Entries whose text was cut to fit a card."""
    skipped: int = 0
    """Entries left out: disabled, or with no text."""


def read(raw: bytes) -> ImportedLore:
    if len(raw) > MAX_BYTES:
        raise InvalidInput(f"The file is too large: at most {MAX_BYTES:,} bytes.")
    if raw.startswith(PNG_SIGNATURE):
        raw = _chara_chunk(raw)
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        message = str(exc).split("\n")[0][:80]
        raise InvalidInput(
            f"That file is not a card or a lorebook: not JSON ({message})."
        ) from None
    if not isinstance(data, dict):
        raise InvalidInput("That file is not a card or a lorebook: expected a JSON object.")
    if data.get("spec") in ("chara_card_v2", "chara_card_v3") or (
        isinstance(data.get("data"), dict) and "first_mes" in data["data"]
    ):
        return _card(data)
    if "lorebookVersion" in data:
        return _entries(data.get("entries"), "NovelAI lorebook", NOVELAI)
    if "entries" in data:
        return _entries(data.get("entries"), "world info", WORLD_INFO)
    raise InvalidInput(
        'That file is not a SillyTavern character card ("spec": "chara_card_v2"), '
        'SillyTavern world info ("entries") or a NovelAI lorebook ("lorebookVersion").'
    )


def fill_names(text: str, character: str, user: str) -> str:
    """SillyTavern's placeholders, `{{char}}` and `{{user}}`, filled in."""
    for placeholder, value in (("{{char}}", character), ("{{user}}", user)):
        text = text.replace(placeholder, value).replace(placeholder.upper(), value)
    return text.replace("<BOT>", character).replace("<USER>", user)


def world_info(cards: list[LoreCard]) -> str:
    """A story's lore as SillyTavern world info JSON (what `read` takes back)."""
    entries = {
        str(uid): {
            "uid": uid,
            "key": list(card.triggers),
            "keysecondary": [],
            "comment": card.name,
            "content": card.text,
            "constant": False,
            "selective": True,
            "order": 100,
            "position": 0,
            "disable": False,
        }
        for uid, card in enumerate(cards)
    }
    return json.dumps({"entries": entries}, ensure_ascii=False, indent=2) + "\n"


# -- formats -----------------------------------------------------------------------------


def _card(data: dict[str, Any]) -> ImportedLore:
    """A V2 card: the character as a card of its own (description), memory from its
    personality and scenario, and its embedded lorebook's entries."""
    body = data.get("data")
    if not isinstance(body, dict):
        raise InvalidInput('"data": expected an object (a V2 character card).')
    name = _string(body, "name", "data.", required=True)
    out = ImportedLore("character card")
    description = _string(body, "description", "data.")
    if description:
        text, cut = _fit(description)
        out.cards.append(LoreCard(_name(name), (_trigger(name),), text))
        out.shortened += cut
    memory = [_string(body, key, "data.") for key in ("personality", "scenario")]
    out.memory = "\n".join(part for part in memory if part)
    out.character = _name(name)
    out.scenario = _string(body, "scenario", "data.")
    out.greeting = _string(body, "first_mes", "data.")
    book = body.get("character_book")
    if book is not None:
        if not isinstance(book, dict):
            raise InvalidInput('"data.character_book": expected an object.')
        where = "data.character_book."
        inner = _entries(book.get("entries"), "character book", CHARACTER_BOOK, where)
        out.cards += inner.cards
        out.shortened += inner.shortened
        out.skipped += inner.skipped
    return out


def _entries(entries: Any, kind: str, fields: _Fields, where: str = "") -> ImportedLore:
    if isinstance(entries, dict):  # SillyTavern keys its entries by uid
        items = list(entries.items())
    elif isinstance(entries, list):
        items = [(str(i), e) for i, e in enumerate(entries)]
    else:
        raise InvalidInput(f'"{where}entries": expected a list or an object of entries.')
    if len(items) > MAX_ENTRIES:
        raise InvalidInput(f'"{where}entries": at most {MAX_ENTRIES} entries, got {len(items)}.')
    out = ImportedLore(kind)
    for key, entry in items:
        path = (
            f"{where}entries[{key!r}]." if isinstance(entries, dict) else f"{where}entries[{key}]."
        )
        if not isinstance(entry, dict):
            raise InvalidInput(f'"{path[:-1]}": expected an object.')
        made = _entry(entry, path, fields)
        if made is None:
            out.skipped += 1
            continue
        name, triggers, content = made
        text, cut = _fit(content)
        out.cards.append(LoreCard(_name(name), triggers, text))
        out.shortened += cut
    return out


@dataclass(frozen=True)
class _Fields:
    """Where a format keeps an entry's parts."""

    keys: str
    content: str
    names: tuple[str, ...]
    """Fields that may name the entry, first found wins (else its first key)."""
    off: tuple[str, bool]
    """The field, and its value, that switch an entry off."""


WORLD_INFO = _Fields("key", "content", ("comment",), ("disable", True))
CHARACTER_BOOK = _Fields("keys", "content", ("name", "comment"), ("enabled", False))
NOVELAI = _Fields("keys", "text", ("displayName",), ("enabled", False))


def _entry(
    entry: dict[str, Any], path: str, fields: _Fields
) -> tuple[str, tuple[str, ...], str] | None:
    """(name, triggers, text) of one entry, or None for one that is off or empty."""
    keys = _keys(entry.get(fields.keys, []), f"{path}{fields.keys}")
    content = _string(entry, fields.content, path)
    flag, off = fields.off
    if entry.get(flag) is off or not content.strip():
        return None
    named = (_string(entry, field, path) for field in fields.names)
    name = next((n for n in named if n), "") or (keys[0] if keys else "")
    if not name:
        raise InvalidInput(f'"{path}{fields.names[0]}": an entry needs a name or at least one key.')
    return name, keys or (_trigger(name),), content


# -- pieces ------------------------------------------------------------------------------


def _chara_chunk(png: bytes) -> bytes:
    """The JSON in a PNG's `chara` text chunk (SillyTavern writes the card there, as
    base64)."""
    at = len(PNG_SIGNATURE)
    while at + 8 <= len(png):
        length, kind = struct.unpack(">I4s", png[at : at + 8])
        body = png[at + 8 : at + 8 + length]
        if len(body) < length:
            break
        if kind in (b"tEXt", b"zTXt", b"iTXt"):
            keyword, _, text = body.partition(b"\x00")
            if keyword == b"chara":
                if kind == b"zTXt":
                    text = zlib.decompress(text[1:])
                elif kind == b"iTXt":  # compression flag, method, language, translated keyword
                    flag, rest = text[0], text[2:]
                    rest = rest.split(b"\x00", 2)[-1]
                    text = zlib.decompress(rest) if flag else rest
                try:
                    return base64.b64decode(text, validate=False)
                except (binascii.Error, ValueError):
                    raise InvalidInput("The PNG's character card is not base64.") from None
        at += 12 + length
    raise InvalidInput('That PNG holds no character card (no "chara" text chunk).')


def _string(data: dict[str, Any], key: str, path: str, *, required: bool = False) -> str:
    value = data.get(key)
    if value is None and not required:
        return ""
    if not isinstance(value, str) or (required and not value.strip()):
        raise InvalidInput(f'"{path}{key}": expected {"a non-empty" if required else "a"} text.')
    return value.strip()


def _keys(value: Any, path: str) -> tuple[str, ...]:
    if isinstance(value, str):  # some tools write one comma-separated string
        value = value.split(",")
    if not isinstance(value, list) or not all(isinstance(k, str) for k in value):
        raise InvalidInput(f'"{path}": expected a list of words.')
    words = [" ".join(k.split()) for k in value]
    words = [w for w in words if w and len(w) <= MAX_TRIGGER_CHARS]
    return tuple(dict.fromkeys(words))[:MAX_TRIGGERS]


def _name(name: str) -> str:
    return " ".join(name.split())[:MAX_LORE_NAME]


def _trigger(name: str) -> str:
    return " ".join(name.split())[:MAX_TRIGGER_CHARS]


def _fit(text: str) -> tuple[str, int]:
    """`text` cut at a sentence end to fit a card, and 1 if it was cut."""
    text = " ".join(text.split())
    if len(text) <= MAX_NOTE_CHARS:
        return text, 0
    kept = ""
    for sentence in split_sentences(text):
        if len(kept) + len(sentence) + 1 > MAX_NOTE_CHARS:
            break
        kept = f"{kept} {sentence}".strip()
    return (kept or text[: MAX_NOTE_CHARS - 1].rstrip() + "…"), 1
