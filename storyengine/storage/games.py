"""Round-robin games: seats, whose turn it is, its deadline, each channel's timeout."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any

from ..records import UNKNOWN_SERVER, Player
from .database import Repository

COMMUNITIES_PER_QUERY = 500
"""Communities named in one query (SQLite and PostgreSQL bound the parameters)."""


class GameRepository(Repository):
    async def players(self, story_id: int) -> list[Player]:
        rows = await self.fetch(
            "SELECT * FROM players WHERE story_id = ? ORDER BY seat", (story_id,)
        )
        return [Player(r["user_id"], r["user_name"], r["seat"], bool(r["active"])) for r in rows]

    async def add_player(self, story_id: int, user_id: str, user_name: str) -> None:
        """Seat a player at the end of the order (a returning player too)."""
        async with self.transaction() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT COALESCE(MAX(seat), 0) + 1 FROM players WHERE story_id = ?", (story_id,)
                )
            )
            await db.execute(
                "INSERT INTO players (story_id, user_id, user_name, seat) VALUES (?, ?, ?, ?)"
                " ON CONFLICT (story_id, user_id) DO UPDATE SET active = 1, seat = excluded.seat,"
                " user_name = excluded.user_name",
                (story_id, user_id, user_name, int(rows[0][0])),
            )

    async def set_player_active(self, story_id: int, user_id: str, active: bool) -> None:
        await self._write(
            "UPDATE players SET active = ? WHERE story_id = ? AND user_id = ?",
            (int(active), story_id, user_id),
        )

    async def set_turn(self, story_id: int, seat: int | None, deadline: float | None) -> None:
        await self._write(
            "UPDATE stories SET current_seat = ?, turn_deadline = ? WHERE id = ?",
            (seat, deadline, story_id),
        )

    async def turn_pointer(self, story_id: int) -> tuple[int | None, float | None]:
        rows = await self.fetch(
            "SELECT current_seat, turn_deadline FROM stories WHERE id = ?", (story_id,)
        )
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    async def overdue_turns(
        self, now: float, communities: Collection[str] | None = None
    ) -> list[str]:
        overdue = (
            "SELECT channel, turn_deadline FROM stories WHERE status = 'active'"
            " AND mode = 'round-robin' AND turn_deadline IS NOT NULL AND turn_deadline <= ?"
        )
        if communities is None:
            rows = await self.fetch(overdue + " ORDER BY turn_deadline", (now,))
            return [r[0] for r in rows]
        wanted = sorted(set(communities))
        found: list[Any] = []
        for start in range(0, len(wanted), COMMUNITIES_PER_QUERY):
            chunk = wanted[start : start + COMMUNITIES_PER_QUERY]
            marks = ", ".join("?" * len(chunk))
            found += await self.fetch(
                f"{overdue} AND COALESCE(community, ?) IN ({marks})",
                (now, UNKNOWN_SERVER, *chunk),
            )
        return [r[0] for r in sorted(found, key=lambda r: r[1])]

    async def turn_timeout(self, channel: str) -> int | None:
        rows = await self.fetch(
            "SELECT turn_timeout_s FROM channel_settings WHERE channel = ?", (channel,)
        )
        return rows[0][0] if rows else None

    async def set_turn_timeout(self, channel: str, seconds: int) -> None:
        await self._write(
            "INSERT INTO channel_settings (channel, turn_timeout_s) VALUES (?, ?)"
            " ON CONFLICT (channel) DO UPDATE SET turn_timeout_s = excluded.turn_timeout_s",
            (channel, seconds),
        )
