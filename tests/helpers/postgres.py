"""A PostgreSQL database of its own for each test that asks for one.

The server is the local one (`TEST_POSTGRES_URL`, default
postgresql://postgres@127.0.0.1:5432/postgres, trust auth). Each test gets a new
database, dropped after it. Where no server answers, the test is skipped with a message
that says how to start one; with `TALEWEAVER_REQUIRE_POSTGRES=1` (as `.ci/run` sets it),
it fails instead, so CI cannot pass by skipping them.
"""

from __future__ import annotations

import contextlib
import itertools
import os
from collections.abc import AsyncIterator

import pytest

ADMIN_URL = os.environ.get("TEST_POSTGRES_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
HOW_TO_START = (
    f"no PostgreSQL server at {ADMIN_URL}: start one (for instance `docker run -d -p "
    "5432:5432 -e POSTGRES_HOST_AUTH_METHOD=trust postgres:16`) or point "
    "TEST_POSTGRES_URL at one"
)
_names = itertools.count()
_reachable: bool | None = None


async def reachable() -> bool:
    global _reachable
    if _reachable is None:
        import asyncpg

        try:
            connection = await asyncpg.connect(ADMIN_URL, timeout=5)
        except (OSError, asyncpg.PostgresError):
            _reachable = False
        else:
            await connection.close()
            _reachable = True
    return _reachable


def skip_or_fail() -> None:
    if os.environ.get("TALEWEAVER_REQUIRE_POSTGRES") == "1":
        pytest.fail(HOW_TO_START)
    pytest.skip(HOW_TO_START)


def url_of(name: str) -> str:
    base, _, _ = ADMIN_URL.rpartition("/")
    return f"{base}/{name}"


@contextlib.asynccontextmanager
async def fresh_database() -> AsyncIterator[str]:
    """A new, empty database's URL; dropped afterwards (its connections closed)."""
    import asyncpg

    if not await reachable():
        skip_or_fail()
    name = f"taleweaver_test_{os.getpid()}_{next(_names)}"
    admin = await asyncpg.connect(ADMIN_URL)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield url_of(name)
    finally:
        admin = await asyncpg.connect(ADMIN_URL)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


async def table_columns(store) -> list[tuple[str, str]]:
    """Every (table, column) of the database, whichever store it is."""
    if store.dialect == "postgresql":
        rows = await store.db.execute_fetchall(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c"
            " JOIN information_schema.tables t ON t.table_name = c.table_name"
            " AND t.table_schema = c.table_schema"
            " WHERE c.table_schema = 'public' AND t.table_type = 'BASE TABLE'"
            " ORDER BY c.table_name, c.ordinal_position"
        )
        return [(r[0], r[1]) for r in rows]
    out = []
    tables = await store.db.execute_fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    for (table,) in tables:
        for column in await store.db.execute_fetchall(f"PRAGMA table_info({table})"):
            out.append((table, column[1]))
    return out
