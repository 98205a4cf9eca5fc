"""The database: one aiosqlite connection, its write transactions, schema migrations
and backups.

The schema lives only in `migrations/NNNN_name.sql`. `Store.open()` applies those not yet
applied, in order, each in one transaction, and records them in `schema_migrations`.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import Any, Self

import aiosqlite

from ..errors import ConfigError, InvalidInput

log = logging.getLogger(__name__)


_MIGRATION_NAME = re.compile(r"^(\d{4})_([a-z0-9_]+)\.sql$")


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str


@dataclass(frozen=True)
class MigrationStatus:
    version: int
    name: str
    applied_at: str | None


def load_migrations() -> list[Migration]:
    found = []
    for entry in resources.files("storyengine.migrations").iterdir():
        match = _MIGRATION_NAME.match(entry.name)
        if match:
            found.append(Migration(int(match[1]), match[2], entry.read_text(encoding="utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if len(set(versions)) != len(versions):
        raise RuntimeError(f"duplicate migration numbers: {versions}")
    return found


def backup_database(source: Path, target: Path) -> Path:
    """Copy the SQLite database `source` to `target` with SQLite's online backup API:
    a consistent snapshot of what was committed when it started, taken while other
    connections go on writing (copying the file while the bot runs can miss what is
    still in the write-ahead log). The copy is written beside `target`, made a single
    file (no write-ahead log) and renamed into place, so `target` is whole or absent.
    Blocking: run it in a thread."""
    if not source.is_file():
        raise InvalidInput(f"{source}: no database there")
    if target.resolve() == source.resolve():
        raise InvalidInput("the backup must go to another file than the database")
    if target.exists():
        raise InvalidInput(f"{target} already exists; choose a new name for the backup")
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = target.with_name(target.name + ".partial")
    partial.unlink(missing_ok=True)
    src = sqlite3.connect(source)  # it exists: nothing is created
    try:
        src.execute("PRAGMA busy_timeout = 5000")
        dest = sqlite3.connect(partial)
        try:
            src.backup(dest)  # all pages in one step: one read snapshot
            dest.execute("PRAGMA journal_mode = DELETE")  # a single self-contained file
            if dest.execute("PRAGMA quick_check").fetchone()[0] != "ok":
                raise RuntimeError(f"the backup of {source} does not check out")
        finally:
            dest.close()
    finally:
        src.close()
    with partial.open("rb") as handle:
        os.fsync(handle.fileno())
    os.replace(partial, target)
    return target


def pre_migration_backup_path(db_path: Path, schema_version: int, now: datetime) -> Path:
    """`stories.db` → `stories.db.schema-0005.20260101T120000Z.bak`, beside it."""
    stamp = now.strftime("%Y%m%dT%H%M%SZ")
    return db_path.with_name(f"{db_path.name}.schema-{schema_version:04d}.{stamp}.bak")


SAME_LINEAGE = "COALESCE(community, '') = COALESCE(?, '')"
"""SQL: the row belongs to the lineage (of adapters, of reward models) given as the
parameter: a community's, or (NULL) the shared one."""


class Repository:
    """A group of queries over the connection that `Database` owns; the repositories are
    mixed into `Store`, which is all of them over one connection."""

    db: aiosqlite.Connection
    _write: Callable[..., Awaitable[aiosqlite.Cursor]]
    transaction: Callable[[], Any]

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[aiosqlite.Row]:
        """Every row a query returns."""
        return list(await self.db.execute_fetchall(sql, params))


class Database(Repository):
    """One aiosqlite connection. Every write runs inside `transaction()`, which
    serialises writers: coroutines share the connection, so one's open transaction
    must never swallow another's statements."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self._db: aiosqlite.Connection | None = None
        self._write_lock = asyncio.Lock()

    @property
    def db(self) -> aiosqlite.Connection:
        if self._db is None:
            raise RuntimeError("Store is not open")
        return self._db

    async def open(self, *, migrate: bool = True, create: bool = True) -> Self:
        """Connect (and apply pending migrations). `create=False`: a database that is not
        there is an error, not a new empty one."""
        if not create and not self.path.is_file():
            raise ConfigError(
                f"{self.path.resolve()}: no database there (nothing was created); check"
                " --db, STORY_DB_PATH or STORY_DATA_DIR"
            )
        if self.path.parent and not self.path.parent.exists():
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = await aiosqlite.connect(self.path, isolation_level=None)
        self._db.row_factory = aiosqlite.Row
        await self._db.execute("PRAGMA foreign_keys = ON")
        await self._db.execute("PRAGMA journal_mode = WAL")
        await self._db.execute("PRAGMA busy_timeout = 5000")
        await self._db.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version INTEGER PRIMARY KEY, name TEXT NOT NULL,"
            " applied_at TEXT NOT NULL DEFAULT (strftime('%Y-%m-%dT%H:%M:%fZ', 'now')))"
        )
        await self._refuse_unknown_migrations()
        if migrate:
            await self.migrate()
        return self

    async def _refuse_unknown_migrations(self) -> None:
        """A database that a newer release migrated may hold what this release does not
        understand: refuse it rather than misread or damage it."""
        rows = await self.fetch("SELECT version, name FROM schema_migrations")
        known = {m.version for m in load_migrations()}
        unknown = sorted((r[0], r[1]) for r in rows if r[0] not in known)
        if unknown:
            await self.close()
            names = ", ".join(f"{v:04d}_{n}" for v, n in unknown)
            raise ConfigError(
                f"{self.path}: this database was upgraded by a newer Taleweaver (migration "
                f"{names}); run that release, or restore a backup made before the upgrade"
            )

    async def close(self) -> None:
        """Checkpoint the write-ahead log into the database file and close. Safe to call
        twice; waits for a write transaction in progress to end."""
        if self._db is None:
            return
        async with self._write_lock:
            db, self._db = self._db, None
            if db is None:
                return
            try:
                await db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
            except aiosqlite.Error as exc:  # another connection may be reading: fine
                log.warning("could not checkpoint %s: %s", self.path, exc)
            finally:
                await db.close()

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._write_lock:
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    async def _write(self, sql: str, params: tuple[Any, ...] = ()) -> aiosqlite.Cursor:
        async with self.transaction() as db:
            return await db.execute(sql, params)

    async def migration_status(self) -> list[MigrationStatus]:
        rows = await self.fetch("SELECT version, applied_at FROM schema_migrations")
        applied = {r["version"]: r["applied_at"] for r in rows}
        return [
            MigrationStatus(m.version, m.name, applied.get(m.version)) for m in load_migrations()
        ]

    async def schema_version(self) -> int:
        """The newest migration applied (0 for an empty database)."""
        status = await self.migration_status()
        return max((m.version for m in status if m.applied_at), default=0)

    async def ping(self) -> bool:
        """One trivial query answered."""
        rows = await self.fetch("SELECT 1")
        return bool(rows) and rows[0][0] == 1

    async def backup(self, path: Path | str) -> Path:
        """A consistent copy of the database at `path` (SQLite's online backup API, from
        a connection of its own: safe while this one and others write). Only what was
        committed is copied. Returns the path."""
        return await asyncio.to_thread(backup_database, self.path, Path(path))

    async def migrate(self) -> list[Migration]:
        """Apply pending migrations in order, one transaction each. Returns those applied.
        A database that has a schema already is backed up first, beside itself
        (`pre_migration_backup_path`), so an upgrade can be undone."""
        done = {s.version for s in await self.migration_status() if s.applied_at}
        pending = [m for m in load_migrations() if m.version not in done]
        if done and pending:
            target = pre_migration_backup_path(self.path, max(done), datetime.now(UTC))
            await self.backup(target)
            log.warning(
                "backed up %s to %s before applying migration(s) %s",
                self.path,
                target,
                ", ".join(f"{m.version:04d}_{m.name}" for m in pending),
            )
        applied = []
        for migration in load_migrations():
            if migration.version in done:
                continue
            script = (
                "BEGIN;\n"
                + migration.sql
                + f"\n;INSERT INTO schema_migrations (version, name) VALUES "
                f"({migration.version}, '{migration.name}');\nCOMMIT;"
            )
            async with self._write_lock:
                try:
                    await self.db.executescript(script)
                except Exception:
                    if self.db.in_transaction:
                        await self.db.execute("ROLLBACK")
                    raise
            applied.append(migration)
        return applied
