"""`Store`: every repository over one SQLite connection (aiosqlite).

    database.py  the connection, write transactions, migrations, backups
    stories.py   stories, turns and their alternatives, lore, channel settings
    games.py     round-robin seats and turns
    feedback.py  generations, messages, reactions, choices, pairs; the learning switch
    people.py    who is in the data: export and forgetting
    training.py  training runs and reward model versions
    adapters.py  adapter versions (the registry's rows)

Every SQL statement of the project lives in this package.
"""

from __future__ import annotations

from .adapters import AdapterRepository
from .database import (
    Database,
    Migration,
    MigrationStatus,
    backup_database,
    load_migrations,
    pre_migration_backup_path,
)
from .feedback import TRAINABLE_STORY, FeedbackRepository, ReactionEvent
from .games import GameRepository
from .people import FORMER_PLAYER, USER_COLUMNS, PeopleRepository, is_alias, new_alias
from .stories import StoryRepository
from .training import TrainingRepository

__all__ = [
    "FORMER_PLAYER",
    "TRAINABLE_STORY",
    "USER_COLUMNS",
    "Migration",
    "MigrationStatus",
    "ReactionEvent",
    "Store",
    "backup_database",
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
    """The database with every repository: what the engine, the learning loop and the
    CLI are handed."""
