"""The people in the data: every column that can hold a user, their export, and forgetting
them (an alias in their place)."""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from .database import Repository
from .interfaces import ALIAS_PREFIX, FORMER_PLAYER

log = logging.getLogger(__name__)


USER_COLUMNS: dict[str, tuple[str, ...]] = {
    "stories": ("created_by",),
    "turns": ("author_id", "author_name"),
    "players": ("user_id", "user_name"),
    "feedback": ("user_id",),
    "choices": ("user_id",),
    "preference_pairs": ("user_id",),
    "communities": ("updated_by",),
    "forgotten_users": ("user_id", "alias"),
}
"""Every column that can hold a user's id or name. `user_data` exports each and
`forget_user` clears each (the forget list itself, `forgotten_users`, excepted). A test
stores a user's data everywhere and fails if any other column holds it."""


def new_alias() -> str:
    """A new alias to stand for a forgotten user (`is_alias` knows it for one)."""
    return ALIAS_PREFIX + secrets.token_hex(8)


class PeopleRepository(Repository):
    async def is_forgotten(self, user_id: str) -> bool:
        rows = await self.fetch("SELECT 1 FROM forgotten_users WHERE user_id = ?", (user_id,))
        return bool(rows)

    async def forgotten_alias(self, user_id: str) -> str | None:
        """The alias that stands for a forgotten user, or None if they are not."""
        rows = await self.fetch("SELECT alias FROM forgotten_users WHERE user_id = ?", (user_id,))
        return rows[0][0] if rows else None

    async def forget_user(self, user_id: str) -> tuple[int, int, int]:
        """Delete the user's reactions and preferences; everywhere else their id becomes
        their alias and their name goes (`USER_COLUMNS` lists every column that can hold
        either; a test keeps the list complete). Their lines stay in shared stories,
        anonymised and excluded from training. Remember the id, so nothing of theirs is
        recorded again and what they do later is stored under the alias."""
        async with self.transaction() as db:
            rows = list(
                await db.execute_fetchall(
                    "SELECT alias FROM forgotten_users WHERE user_id = ?", (user_id,)
                )
            )
            alias = rows[0][0] if rows else new_alias()
            await db.execute(
                "INSERT INTO forgotten_users (user_id, alias) VALUES (?, ?)"
                " ON CONFLICT (user_id) DO NOTHING",
                (user_id, alias),
            )
            feedback = await db.execute("DELETE FROM feedback WHERE user_id = ?", (user_id,))
            pairs = await db.execute("DELETE FROM preference_pairs WHERE user_id = ?", (user_id,))
            turns = await db.execute(
                "UPDATE turns SET author_id = ?, author_name = ?, train_excluded = 1"
                " WHERE author_id = ?",
                (alias, FORMER_PLAYER, user_id),
            )
            await db.execute("UPDATE choices SET user_id = ? WHERE user_id = ?", (alias, user_id))
            await db.execute(
                "UPDATE stories SET created_by = ? WHERE created_by = ?", (alias, user_id)
            )
            await db.execute(
                "UPDATE players SET user_id = ?, user_name = ?, active = 0 WHERE user_id = ?",
                (alias, FORMER_PLAYER, user_id),
            )
            await db.execute(
                "UPDATE communities SET updated_by = ? WHERE updated_by = ?", (alias, user_id)
            )
        return feedback.rowcount, pairs.rowcount, turns.rowcount

    async def _companion_offers(self, ids: tuple[str, str]) -> list[dict[str, Any]]:
        """The user's companion choices, each with its options' texts (a JSON list, in
        the order offered)."""
        offers = [
            dict(r)
            for r in await self.fetch(
                "SELECT id AS choice_id, story_id, status, created_at FROM choices"
                " WHERE user_id IN (?, ?) ORDER BY id",
                ids,
            )
        ]
        texts: dict[int, list[str]] = {offer["choice_id"]: [] for offer in offers}
        for row in await self.fetch(
            "SELECT o.choice_id, g.output FROM choice_options o"
            " JOIN generations g ON g.id = o.generation_id JOIN choices c ON c.id = o.choice_id"
            " WHERE c.user_id IN (?, ?) ORDER BY o.choice_id, o.position",
            ids,
        ):
            texts[row[0]].append(row[1])
        for offer in offers:
            offer["options"] = json.dumps(texts[offer["choice_id"]])
        return offers

    async def user_data(self, user_id: str) -> dict[str, Any]:
        """Every row that refers to the user (by id, or by their alias once forgotten),
        table by table, as plain data: what `/story my-data` hands over."""
        alias = await self.forgotten_alias(user_id)
        ids = (user_id, alias or user_id)
        q = self.db.execute_fetchall

        def rows(found: Any) -> list[dict[str, Any]]:
            return [dict(r) for r in found]

        return {
            "user_id": user_id,
            "forgotten": {"alias": alias} if alias else None,
            "stories_started": rows(
                await q(
                    "SELECT id AS story_id, channel, premise, genre, mode, status, memory,"
                    " authors_note, community, created_at, ended_at FROM stories"
                    " WHERE created_by IN (?, ?) ORDER BY id",
                    ids,
                )
            ),
            "turns": rows(
                await q(
                    "SELECT s.channel, t.story_id, t.position, t.author_name, t.text, t.status,"
                    " t.created_at FROM turns t JOIN stories s ON s.id = t.story_id"
                    " WHERE t.author_id IN (?, ?) ORDER BY t.id",
                    ids,
                )
            ),
            "reactions": rows(
                await q(
                    "SELECT f.generation_id, f.message_id, g.output, f.emoji, f.value,"
                    " f.created_at FROM feedback f JOIN generations g ON g.id = f.generation_id"
                    " WHERE f.user_id IN (?, ?) ORDER BY f.id",
                    ids,
                )
            ),
            "round_robin_seats": rows(
                await q(
                    "SELECT p.story_id, s.channel, p.user_name, p.seat, p.active, p.joined_at"
                    " FROM players p JOIN stories s ON s.id = p.story_id"
                    " WHERE p.user_id IN (?, ?) ORDER BY p.story_id",
                    ids,
                )
            ),
            "companion_offers": await self._companion_offers(ids),
            "preferences": rows(
                await q(
                    "SELECT p.source, c.output AS chosen, r.output AS rejected, p.created_at"
                    " FROM preference_pairs p JOIN generations c ON c.id = p.chosen_generation_id"
                    " JOIN generations r ON r.id = p.rejected_generation_id"
                    " WHERE p.user_id IN (?, ?) ORDER BY p.id",
                    ids,
                )
            ),
            "learning_switches": rows(
                await q(
                    "SELECT id AS community, learning, updated_at FROM communities"
                    " WHERE updated_by IN (?, ?) ORDER BY id",
                    ids,
                )
            ),
        }
