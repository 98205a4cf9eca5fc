"""`Store`: every repository over one SQLite connection (aiosqlite).

    database.py  the connection, write transactions, migrations, backups
    stories.py   stories, turns and their alternatives, lore, channel settings
    games.py     round-robin seats and turns
    feedback.py  generations, messages, reactions, choices, pairs; the learning switch
    people.py    who is in the data: export and forgetting
    training.py  training runs and reward model versions
    adapters.py  adapter versions (the registry's rows)

Each repository is described by a protocol of interfaces.py, and `Store` is a
`StoryStore`: the engine and the learning code depend on those protocols, and only
what makes the database (the engine, the CLI, a training run, `compare`) names
`Store`.

Every SQL statement of the project lives in this package.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .adapters import AdapterRepository
from .database import (
    Database,
    Migration,
    MigrationStatus,
    backup_database,
    copy_database,
    load_migrations,
    pre_migration_backup_path,
)
from .feedback import TRAINABLE_STORY, FeedbackRepository
from .games import GameRepository
from .interfaces import FORMER_PLAYER, ReactionEvent, is_alias
from .people import USER_COLUMNS, PeopleRepository, new_alias
from .stories import StoryRepository
from .training import TrainingRepository

if TYPE_CHECKING:
    from .interfaces import StoryStore

__all__ = [
    "FORMER_PLAYER",
    "TRAINABLE_STORY",
    "USER_COLUMNS",
    "Migration",
    "MigrationStatus",
    "ReactionEvent",
    "Store",
    "backup_database",
    "copy_database",
    "is_alias",
    "load_migrations",
    "new_alias",
    "pre_migration_backup_path",
]


class Store(
    Database,
    StoryRepository,
    GameRepository,
    FeedbackRepository,
    PeopleRepository,
    TrainingRepository,
    AdapterRepository,
):
    """The database with every repository: a `StoryStore` (interfaces.py). Made by the
    engine, the CLI and training runs; what they hand it to sees only a protocol."""


if TYPE_CHECKING:

    def _is_a_story_store(store: Store) -> StoryStore:
        """Never called: pyright checks here that `Store` (so every repository in it)
        matches every protocol it stands for, types included."""
        return store
