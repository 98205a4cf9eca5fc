"""A story as a file: `/story save` writes one, `/story load` starts it again anywhere.

The file is JSON with a format name and version, the premise, genre and mode, the
channel's style, the memory and author's note, the lore cards and the turns in order
(authors as display names, each storyteller turn with the alternatives written for it).
Nothing in it identifies anyone by id, and nothing of it is ever trained on: a loaded
story's lines are the loader's to keep or delete, and its replies were not written by
this model from these prompts.

`parse` checks everything before anything is stored: the version, every field's type
and size; a bad file is refused with the field's path and what was expected, and
unknown fields are ignored (a newer release may add some).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput

FORMAT = "taleweaver.story"
VERSION = 1
MAX_BYTES = 2_000_000
MAX_TURNS = 2000
MAX_ALTERNATIVES = 16
MAX_TURN_CHARS = 20_000
MODES = ("solo", "round-robin", "companion")


@dataclass(frozen=True)
class SavedTurn:
    kind: str
    """user or bot"""
    text: str
    author: str | None = None
    """The display name of who wrote a user turn."""
    alternatives: tuple[str, ...] = ()
    """Other versions of a storyteller turn (retries, best-of-n candidates)."""


@dataclass(frozen=True)
class SavedLore:
    name: str
    triggers: tuple[str, ...]
    text: str


@dataclass(frozen=True)
class SavedStory:
    premise: str
    genre: str | None = None
    mode: str = "solo"
    memory: str = ""
    authors_note: str = ""
    preset: str | None = None
    sampling: dict[str, Any] = field(default_factory=dict)
    lore: tuple[SavedLore, ...] = ()
    turns: tuple[SavedTurn, ...] = ()

    def to_json(self) -> str:
        data = {
            "format": FORMAT,
            "version": VERSION,
            "premise": self.premise,
            "genre": self.genre,
            "mode": self.mode,
            "memory": self.memory,
            "authors_note": self.authors_note,
            "settings": {"preset": self.preset, "sampling": self.sampling},
            "lore": [
                {"name": c.name, "triggers": list(c.triggers), "text": c.text} for c in self.lore
            ],
            "turns": [
                {"kind": t.kind, "author": t.author, "text": t.text}
                | ({"alternatives": list(t.alternatives)} if t.kind == "bot" else {})
                for t in self.turns
            ],
        }
        return json.dumps(data, ensure_ascii=False, indent=2) + "\n"


def parse(raw: bytes | str, *, max_text: int) -> SavedStory:
    """A save file's bytes → a `SavedStory`, or `InvalidInput` naming what is wrong.
    `max_text`: the longest premise or memory accepted (the engine's input limit)."""
    if len(raw) > MAX_BYTES:
        raise InvalidInput(f"The file is too large: a story file is at most {MAX_BYTES:,} bytes.")
    try:
        data = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise InvalidInput(f"That is not a story file: not JSON ({_short(exc)}).") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise InvalidInput(f'That is not a story file: "format" should be "{FORMAT}".')
    version = data.get("version")
    if not isinstance(version, int) or isinstance(version, bool):
        raise InvalidInput('"version": expected a whole number.')
    if version > VERSION:
        raise InvalidInput(
            f"The file was saved by a newer Taleweaver (format version {version}; this one "
            f"reads up to {VERSION}). Update, then load it."
        )
    if version < 1:
        raise InvalidInput(f'"version": expected 1 to {VERSION}, got {version}.')
    settings = _object(data.get("settings", {}), "settings")
    sampling = _object(settings.get("sampling", {}), "settings.sampling")
    return SavedStory(
        premise=_text(data, "premise", max_text),
        genre=_text(data, "genre", 40, optional=True) or None,
        mode=_choice(data.get("mode", "solo"), "mode", MODES),
        memory=_text(data, "memory", max_text, optional=True),
        authors_note=_text(data, "authors_note", 400, optional=True),
        preset=_text(settings, "preset", 40, optional=True, where="settings.") or None,
        sampling=sampling,
        lore=tuple(_lore(card, i) for i, card in enumerate(_list(data, "lore", 50))),
        turns=tuple(_turn(turn, i) for i, turn in enumerate(_list(data, "turns", MAX_TURNS))),
    )


def _lore(card: Any, i: int) -> SavedLore:
    where = f"lore[{i}]."
    card = _object(card, where[:-1])
    triggers = card.get("triggers", [])
    if not isinstance(triggers, list) or len(triggers) > 10:
        raise InvalidInput(f'"{where}triggers": expected a list of at most 10 words.')
    words = []
    for j, word in enumerate(triggers):
        if not isinstance(word, str) or len(word) > 40:
            raise InvalidInput(f'"{where}triggers[{j}]": expected a word of at most 40 characters.')
        words.append(word)
    return SavedLore(
        _text(card, "name", 60, where=where), tuple(words), _text(card, "text", 400, where=where)
    )


def _turn(turn: Any, i: int) -> SavedTurn:
    where = f"turns[{i}]."
    turn = _object(turn, where[:-1])
    kind = _choice(turn.get("kind"), f"{where}kind", ("user", "bot"))
    alternatives = turn.get("alternatives", [])
    if kind == "user" and alternatives:
        raise InvalidInput(f'"{where}alternatives": only the storyteller\'s turns have them.')
    if not isinstance(alternatives, list) or len(alternatives) > MAX_ALTERNATIVES:
        raise InvalidInput(
            f'"{where}alternatives": expected a list of at most {MAX_ALTERNATIVES} texts.'
        )
    others = []
    for j, text in enumerate(alternatives):
        if not isinstance(text, str) or not text.strip() or len(text) > MAX_TURN_CHARS:
            raise InvalidInput(
                f'"{where}alternatives[{j}]": expected a text of 1 to {MAX_TURN_CHARS} characters.'
            )
        others.append(text)
    return SavedTurn(
        kind,
        _text(turn, "text", MAX_TURN_CHARS, where=where),
        _text(turn, "author", 80, optional=True, where=where) or None,
        tuple(others),
    )


def _object(value: Any, name: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise InvalidInput(f'"{name}": expected an object.')
    return value


def _list(data: dict[str, Any], name: str, most: int) -> list[Any]:
    value = data.get(name, [])
    if not isinstance(value, list) or len(value) > most:
        raise InvalidInput(f'"{name}": expected a list of at most {most} entries.')
    return value


def _choice(value: Any, name: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise InvalidInput(f'"{name}": expected one of {", ".join(allowed)}, got {value!r:.40}.')
    return str(value)


def _text(
    data: dict[str, Any], name: str, most: int, *, optional: bool = False, where: str = ""
) -> str:
    value = data.get(name)
    if value is None and optional:
        return ""
    if not isinstance(value, str) or len(value) > most or (not optional and not value.strip()):
        least = 0 if optional else 1
        raise InvalidInput(f'"{where}{name}": expected a text of {least} to {most} characters.')
    return value


def _short(exc: Exception) -> str:
    return str(exc).split("\n")[0][:80]
