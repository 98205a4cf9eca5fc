"""Plain records returned by the store and the engine."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

StoryMode = Literal["solo", "round-robin", "companion"]
MODES: tuple[StoryMode, ...] = ("solo", "round-robin", "companion")


DIRECT_MESSAGES = "dm"
"""The community of direct messages (and terminal sessions' default): never trained on."""
UNKNOWN_SERVER = "before-opt-in"
"""The community of Discord stories from before communities were recorded (migration
0004), whose server is not known; stories with no community at all count as its too
where a process asks for its communities' games."""


@dataclass(frozen=True)
class Author:
    """Who acts or wrote a turn: a Discord user id and display name, or a terminal user.
    `moderator`: may manage the channel (Discord's Manage Messages), which overrides
    story ownership (see `storyengine.story.permissions`)."""

    id: str
    name: str
    moderator: bool = field(default=False, compare=False)


@dataclass(frozen=True)
class Story:
    id: int
    channel: str
    premise: str
    genre: str | None
    mode: StoryMode
    status: Literal["active", "ended"]
    memory: str
    authors_note: str
    created_by: str | None
    community: str | None
    created_at: str
    ended_at: str | None


@dataclass(frozen=True)
class Turn:
    id: int
    story_id: int
    position: int
    action: int
    kind: Literal["user", "bot"]
    author_id: str | None
    author_name: str | None
    text: str
    status: Literal["active", "replaced", "undone"]
    generation_id: int | None


@dataclass(frozen=True)
class TurnResult:
    """What a generating operation produced: the bot's new turn (and the user's line)."""

    story: Story
    turn: Turn
    user_turn: Turn | None
    generation_id: int
    latency_s: float

    @property
    def text(self) -> str:
        return self.turn.text


@dataclass(frozen=True)
class ImportReport:
    """What a card or lorebook import did."""

    kind: str
    cards: list[str]
    """The lore cards added or replaced, by name."""
    memory_set: bool
    memory_kept: bool
    """The file had a memory, and the story already had one (left as it was)."""
    shortened: int
    skipped: int
    started: bool = False
    """No story was running: a character card started one with its greeting."""

    def describe(self) -> str:
        verb = "Started a story from" if self.started else "Imported"
        parts = [f"{verb} a {self.kind}: {len(self.cards)} lore card(s)"]
        if self.cards:
            parts[0] += (
                " (" + ", ".join(self.cards[:10]) + (", …" if len(self.cards) > 10 else "") + ")"
            )
        if self.memory_set:
            parts.append("its personality and scenario are now the story's memory")
        if self.memory_kept:
            parts.append("the story's memory was kept (the card's was not used)")
        if self.shortened:
            parts.append(f"{self.shortened} shortened to 400 characters")
        if self.skipped:
            parts.append(f"{self.skipped} disabled or empty left out")
        return "; ".join(parts) + "."


@dataclass(frozen=True)
class Swipe:
    """The alternative a swipe shows: `number` of `total` (1-based), and the person's
    line it answers, if any."""

    turn: Turn
    number: int
    total: int
    user_turn: Turn | None

    @property
    def text(self) -> str:
        return self.turn.text


@dataclass(frozen=True)
class Player:
    user_id: str
    user_name: str
    seat: int
    active: bool


@dataclass(frozen=True)
class TurnState:
    """Round-robin state: the players in join order, whose turn it is, and until when."""

    story_id: int
    players: tuple[Player, ...]
    current: Player | None
    deadline: float | None
    """Unix time at which the turn passes by itself."""

    @property
    def active_players(self) -> tuple[Player, ...]:
        return tuple(p for p in self.players if p.active)


@dataclass(frozen=True)
class ChoiceOption:
    position: int
    generation_id: int
    text: str


@dataclass(frozen=True)
class ChoiceSet:
    """Alternative continuations offered together; choosing one records a preference."""

    id: int
    story: Story
    user_turn: Turn | None
    options: tuple[ChoiceOption, ...]


@dataclass(frozen=True)
class ForgetReport:
    feedback_deleted: int
    preferences_deleted: int
    turns_anonymised: int


@dataclass(frozen=True)
class LoreCard:
    name: str
    triggers: tuple[str, ...]
    text: str
    id: int | None = None

    def render(self) -> str:
        return f"[{self.name}: {self.text}]"

    def triggered_by(self, text: str) -> bool:
        return any(
            re.search(r"\b" + re.escape(t) + r"\b", text, re.IGNORECASE) for t in self.triggers if t
        )
