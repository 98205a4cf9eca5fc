"""Storage: the one place SQL lives (SQLite through aiosqlite), with its migrations.

It imports nothing from `story`, `serving` or `learning`. They depend on the protocols
below (interfaces.py), one per aggregate; `storage.store.Store` implements them all and
is named only where the database is made.
"""

from .interfaces import (
    FORMER_PLAYER,
    AdapterRecords,
    DatabaseLifecycle,
    EngineRecords,
    FeedbackRecords,
    GameRecords,
    PeopleRecords,
    ReactionEvent,
    RewardModelRecords,
    StoryRecords,
    StoryStore,
    TellingRecords,
    TrainingRunRecords,
    is_alias,
)

__all__ = [
    "FORMER_PLAYER",
    "AdapterRecords",
    "DatabaseLifecycle",
    "EngineRecords",
    "FeedbackRecords",
    "GameRecords",
    "PeopleRecords",
    "ReactionEvent",
    "RewardModelRecords",
    "StoryRecords",
    "StoryStore",
    "TellingRecords",
    "TrainingRunRecords",
    "is_alias",
]
