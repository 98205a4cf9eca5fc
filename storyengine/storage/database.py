"""The database: its connection (one aiosqlite connection to a SQLite file, the default;
or an asyncpg pool to PostgreSQL, `STORY_DB_URL`), write transactions, schema migrations
and backups.

The schema lives only in `migrations/NNNN_name.sql` (SQLite) and
`migrations/postgresql/NNNN_name.sql` (the same migrations, numbered alike, in
PostgreSQL's dialect). `Store.open()` applies those not yet applied, in order, each in
one transaction, and records them in `schema_migrations`.
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
from datetime import UTC, datetime, timedelta
from importlib import resources
from pathlib import Path
from typing import Any, Self

import aiosqlite

from ..config import redact_url
from ..errors import ConfigError, InvalidInput, TrainingBusy
from . import postgres
from .postgres import is_postgres_url

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


def load_migrations(dialect: str = "sqlite") -> list[Migration]:
    """The migrations in order: SQLite's, or PostgreSQL's (`dialect="postgresql"`)."""
    package = "storyengine.migrations" + (".postgresql" if dialect == "postgresql" else "")
    found = []
    for entry in resources.files(package).iterdir():
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


ROUND_LOCK = 0x7261_6E64  # "rand": the advisory lock a training run holds (PostgreSQL)


def utc_now(offset_s: float = 0.0) -> str:
    """Now (plus `offset_s` seconds) as the database's timestamps are written:
    `2026-12-07T07:20:01.123Z`, which sort as text in time order."""
    now = datetime.now(UTC) + timedelta(seconds=offset_s)
    return now.strftime("%Y-%m-%dT%H:%M:%S.") + f"{now.microsecond // 1000:03d}Z"


SAME_LINEAGE = "COALESCE(community, '') = COALESCE(?, '')"
"""SQL: the row belongs to the lineage (of adapters, of reward models) given as the
parameter: a community's, or (NULL) the shared one."""


async def inserted_id(db: Any, sql: str, params: Sequence[Any] = ()) -> int:
    """Run an `INSERT` inside the transaction `db`; the new row's id (`RETURNING id`,
    which SQLite and PostgreSQL both speak)."""
    cursor = await db.execute(sql + " RETURNING id", params)
    row = await cursor.fetchone()
    return int(row[0])


class Repository:
    """A group of queries over the connection that `Database` owns; the repositories are
    mixed into `Store`, which is all of them over one connection."""

    db: Any
    _write: Callable[..., Awaitable[Any]]
    transaction: Callable[[], Any]

    async def fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Every row a query returns (each read by name or by position)."""
        return list(await self.db.execute_fetchall(sql, params))

    async def _insert(self, sql: str, params: Sequence[Any] = ()) -> int:
        """An `INSERT` in a transaction of its own; the new row's id."""
        async with self.transaction() as db:
            return await inserted_id(db, sql, params)


class Database(Repository):
    """The connection. Every write runs inside `transaction()`, which serialises
    writers: coroutines share the connection, so one's open transaction must never
    swallow another's statements; and with PostgreSQL, other processes' writers wait on
    the same advisory lock (`postgres.WRITE_LOCK`), as SQLite's wait on its file.

    `location`: a SQLite file's path, or a `postgresql://` URL."""

    def __init__(self, location: Path | str) -> None:
        self.url = str(location) if is_postgres_url(location) else None
        self.dialect = "postgresql" if self.url else "sqlite"
        self.path = Path(location) if self.url is None else Path()
        self._db: aiosqlite.Connection | None = None
        self._pool: Any = None
        self._write_lock = asyncio.Lock()

    @property
    def where(self) -> str:
        """The database, as said to a person (a URL without its password)."""
        return redact_url(str(self.url)) if self.url else str(self.path)

    @property
    def db(self) -> Any:
        """What the repositories execute on: the aiosqlite connection, or (PostgreSQL) the
        running task's transaction, else the pool."""
        if self.url is not None:
            if self._pool is None:
                raise RuntimeError("Store is not open")
            return postgres.current.get() or postgres.Session(self._pool)
        if self._db is None:
            raise RuntimeError("Store is not open")
        return self._db

    async def open(self, *, migrate: bool = True, create: bool = True) -> Self:
        """Connect (and apply pending migrations). `create=False`: a database that is not
        there is an error, not a new empty one."""
        if self.url is not None:
            await self._open_postgres()
        else:
            await self._open_sqlite(create=create)
        await self._refuse_unknown_migrations()
        if migrate:
            await self.migrate()
        return self

    async def _open_sqlite(self, *, create: bool) -> None:
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

    async def _open_postgres(self) -> None:
        try:
            import asyncpg
        except ImportError:
            raise ConfigError(
                "STORY_DB_URL: PostgreSQL needs asyncpg: pip install 'taleweaver[postgres]'"
            ) from None
        try:
            self._pool = await asyncpg.create_pool(self.url, min_size=1, max_size=8)
        except (OSError, asyncpg.PostgresError) as exc:
            raise ConfigError(f"STORY_DB_URL: cannot connect to {self.where}: {exc}") from None
        async with self.transaction() as db:
            await db.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                " version BIGINT PRIMARY KEY, name TEXT NOT NULL, applied_at TEXT NOT NULL)"
            )

    async def _refuse_unknown_migrations(self) -> None:
        """A database that a newer release migrated may hold what this release does not
        understand: refuse it rather than misread or damage it."""
        rows = await self.fetch("SELECT version, name FROM schema_migrations")
        known = {m.version for m in load_migrations(self.dialect)}
        unknown = sorted((r[0], r[1]) for r in rows if r[0] not in known)
        if unknown:
            await self.close()
            names = ", ".join(f"{v:04d}_{n}" for v, n in unknown)
            raise ConfigError(
                f"{self.where}: this database was upgraded by a newer Taleweaver (migration "
                f"{names}); run that release, or restore a backup made before the upgrade"
            )

    async def close(self) -> None:
        """Checkpoint SQLite's write-ahead log into the database file, or close the
        PostgreSQL pool. Safe to call twice; waits for a write transaction in progress
        to end."""
        async with self._write_lock:
            pool, self._pool = self._pool, None
            if pool is not None:
                await pool.close()
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
    async def transaction(self) -> AsyncIterator[Any]:
        """One write transaction: what is written inside is committed together when the
        block ends, or not at all."""
        async with self._write_lock:
            if self.url is not None:
                async with self._pg_transaction() as session:
                    yield session
                return
            await self.db.execute("BEGIN IMMEDIATE")
            try:
                yield self.db
            except BaseException:
                await self.db.execute("ROLLBACK")
                raise
            await self.db.execute("COMMIT")

    @asynccontextmanager
    async def round_lock(self) -> AsyncIterator[None]:
        """One training run at a time across every process on this database (raises
        `TrainingBusy` when another holds it). PostgreSQL: a session advisory lock on a
        connection kept for the run, dropped by the server if the holder dies. SQLite:
        nothing here; the adapter directory's lock file does it (`registry.round_lock`),
        since a SQLite database is one machine's."""
        if self.url is None or self._pool is None:
            yield
            return
        async with self._pool.acquire() as connection:
            if not await connection.fetchval("SELECT pg_try_advisory_lock($1)", ROUND_LOCK):
                raise TrainingBusy()
            try:
                yield
            finally:
                await connection.execute("SELECT pg_advisory_unlock($1)", ROUND_LOCK)

    @asynccontextmanager
    async def _pg_transaction(self) -> AsyncIterator[postgres.Session]:
        if self._pool is None:
            raise RuntimeError("Store is not open")
        async with self._pool.acquire() as connection, connection.transaction():
            await connection.execute("SELECT pg_advisory_xact_lock($1)", postgres.WRITE_LOCK)
            session = postgres.Session(connection)
            token = postgres.current.set(session)
            try:
                yield session
            finally:
                postgres.current.reset(token)

    async def _write(self, sql: str, params: tuple[Any, ...] = ()) -> Any:
        """One statement in a transaction of its own; its cursor (`rowcount`, and the
        rows of a `RETURNING`, already fetched)."""
        async with self.transaction() as db:
            cursor = await db.execute(sql, params)
            if self.url is None and "RETURNING" in sql.upper():
                return postgres.Cursor(await cursor.fetchall(), cursor.rowcount)
            return cursor

    async def migration_status(self) -> list[MigrationStatus]:
        rows = await self.fetch("SELECT version, applied_at FROM schema_migrations")
        applied = {r["version"]: r["applied_at"] for r in rows}
        return [
            MigrationStatus(m.version, m.name, applied.get(m.version))
            for m in load_migrations(self.dialect)
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
        if self.url is not None:
            raise InvalidInput(
                "a PostgreSQL database is backed up with its own tools: pg_dump "
                f"{self.where} > backup.sql"
            )
        return await asyncio.to_thread(backup_database, self.path, Path(path))

    async def migrate(self) -> list[Migration]:
        """Apply pending migrations in order, one transaction each. Returns those applied.
        A database that has a schema already is backed up first, beside itself
        (`pre_migration_backup_path`), so an upgrade can be undone."""
        if self.url is not None:
            return await self._migrate_postgres()
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
        for migration in pending:
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

    async def _migrate_postgres(self) -> list[Migration]:
        """Each pending migration in a transaction of its own, under the write lock: of
        several processes starting at once, one migrates and the others find it done.
        (Back a PostgreSQL database up with pg_dump before upgrading.)"""
        applied = []
        for migration in load_migrations("postgresql"):
            async with self.transaction() as db:
                rows = await db.execute(
                    "SELECT 1 FROM schema_migrations WHERE version = ?", (migration.version,)
                )
                if await rows.fetchone() is not None:
                    continue
                await db.script(migration.sql)
                await db.execute(
                    "INSERT INTO schema_migrations (version, name, applied_at) VALUES (?, ?, ?)",
                    (migration.version, migration.name, utc_now()),
                )
            applied.append(migration)
        return applied


COPY_ORDER = (
    "channel_settings",
    "communities",
    "forgotten_users",
    "stories",
    "generations",
    "turns",
    "lore_cards",
    "players",
    "story_messages",
    "feedback",
    "choices",
    "choice_options",
    "preference_pairs",
    "adapters",
    "training_runs",
    "reward_models",
)
"""Every table, each after those it refers to (`copy_database`)."""
SELF_REFERENCES = {"generations": "candidate_of", "adapters": "parent_version"}
"""Columns that refer to rows of their own table: filled in once every row is there."""


async def copy_database(
    source: Database, target: Database, *, say: Callable[[str], None] = print
) -> dict[str, int]:
    """Copy every row of `source` into `target` (both open, at the same schema version;
    the target empty), in one transaction of the target's, then check that each table
    holds as many rows as the source's. Ids are kept; PostgreSQL's id counters are moved
    past them. Returns the rows copied per table."""
    if await source.schema_version() != await target.schema_version():
        raise InvalidInput("migrate both databases to the same schema version first")
    for table in COPY_ORDER:
        if (await target.fetch(f"SELECT COUNT(*) FROM {table}"))[0][0]:
            raise InvalidInput(f"{target.where} already holds {table}: copy into an empty one")
    copied: dict[str, int] = {}
    async with target.transaction() as db:
        for table in COPY_ORDER:
            rows = await source.fetch(f"SELECT * FROM {table}")
            if not rows:
                copied[table] = 0
                continue
            columns = list(rows[0].keys())
            later = SELF_REFERENCES.get(table)
            values = [tuple(None if c == later else r[c] for c in columns) for r in rows]
            marks = ", ".join("?" for _ in columns)
            await db.executemany(
                f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({marks})", values
            )
            if later:
                key = "id" if "id" in columns else "version"
                await db.executemany(
                    f"UPDATE {table} SET {later} = ? WHERE {key} = ?",
                    [(r[later], r[key]) for r in rows if r[later] is not None],
                )
            copied[table] = len(rows)
            say(f"{table}: {len(rows)} rows")
        if target.dialect == "postgresql":
            cursor = await db.execute(
                "SELECT table_name FROM information_schema.columns WHERE column_name = 'id'"
                " AND is_identity = 'YES' AND table_schema = current_schema()"
            )
            for (table,) in await cursor.fetchall():
                await db.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'),"
                    f" (SELECT COALESCE(MAX(id), 0) + 1 FROM {table}), false)"
                )
    for table, count in copied.items():
        there = (await target.fetch(f"SELECT COUNT(*) FROM {table}"))[0][0]
        if there != count:
            raise RuntimeError(f"{table}: {count} rows copied, {there} in {target.where}")
    return copied
