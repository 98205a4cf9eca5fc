"""PostgreSQL under the repositories: asyncpg behind the few calls they make of
aiosqlite (`execute` giving a cursor with `rowcount`, `fetchone`, `fetchall`;
`executemany`; `execute_fetchall`), so that one set of repositories serves both stores.

The repositories write portable SQL: `?` parameters (numbered `$1, $2, ...` here),
`INSERT ... ON CONFLICT`, `RETURNING id` where they need a new row's id, timestamps as
ISO text made in Python. Writers serialise on one advisory lock, taken first in every
write transaction, as SQLite's writers do on its database file: several processes may
write at once and none loses another's update; reads do not wait.
"""

from __future__ import annotations

import contextvars
import functools
from collections.abc import Iterable, Sequence
from typing import Any

WRITE_LOCK = 0x7461_6C65  # "tale": the advisory lock every write transaction takes first
URL_SCHEMES = ("postgresql://", "postgres://")


def is_postgres_url(location: object) -> bool:
    return isinstance(location, str) and location.startswith(URL_SCHEMES)


@functools.lru_cache(maxsize=1024)
def numbered(sql: str) -> str:
    """`?` parameters as PostgreSQL's `$1, $2, ...` (none inside quoted text)."""
    out, n, quoted = [], 0, False
    for ch in sql:
        if ch == "'":
            quoted = not quoted
        if ch == "?" and not quoted:
            n += 1
            out.append(f"${n}")
        else:
            out.append(ch)
    return "".join(out)


def _returns_rows(sql: str) -> bool:
    words = sql.split()
    return bool(words) and (
        words[0].upper() in ("SELECT", "WITH", "VALUES") or "RETURNING" in map(str.upper, words)
    )


class Cursor:
    """What a statement gave: its rows (a query, or `RETURNING`), already read, and how
    many rows it touched. SQLite's `RETURNING` rows are read into one too, before
    their transaction commits."""

    def __init__(self, rows: list[Any], rowcount: int) -> None:
        self._rows = rows
        self.rowcount = rowcount

    async def fetchone(self) -> Any:
        return self._rows[0] if self._rows else None

    async def fetchall(self) -> list[Any]:
        return list(self._rows)


class Session:
    """One connection (inside a transaction) or the pool (outside one), spoken to as
    the repositories speak to aiosqlite."""

    def __init__(self, target: Any) -> None:
        self._target = target

    async def execute(self, sql: str, params: Sequence[Any] = ()) -> Cursor:
        query = numbered(sql)
        if _returns_rows(sql):
            rows = await self._target.fetch(query, *params)
            return Cursor(rows, len(rows))
        status = await self._target.execute(query, *params)
        count = status.rsplit(" ", 1)[-1]
        return Cursor([], int(count) if count.isdigit() else 0)

    async def executemany(self, sql: str, rows: Iterable[Sequence[Any]]) -> Cursor:
        rows = [tuple(r) for r in rows]
        if rows:
            await self._target.executemany(numbered(sql), rows)
        return Cursor([], len(rows))

    async def script(self, sql: str) -> None:
        """Several statements, no parameters (a migration)."""
        await self._target.execute(sql)

    async def execute_fetchall(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        return list(await self._target.fetch(numbered(sql), *params))


current: contextvars.ContextVar[Session | None] = contextvars.ContextVar(
    "taleweaver_pg_transaction", default=None
)
"""The transaction the running task is inside, so that its reads see its own writes."""
