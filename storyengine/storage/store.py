"""SQLite storage (aiosqlite) and schema migrations.

The schema lives only in `migrations/NNNN_name.sql`. `Store.open()` applies those not yet
applied, in order, each in one transaction, and records them in `schema_migrations`.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import secrets
import sqlite3
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiosqlite

from ..errors import ConfigError, InvalidInput
from ..records import LoreCard, Player, Story, Turn

if TYPE_CHECKING:
    from ..saves import SavedStory

log = logging.getLogger(__name__)

_UPSERT_LORE = (
    "INSERT INTO lore_cards (story_id, name, triggers, text) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (story_id, name) DO UPDATE SET triggers = excluded.triggers,"
    " text = excluded.text"
)
"""A lore card added, or replacing the story's card of the same name."""


def _lore_row(story_id: int, card: Any) -> tuple[int, str, str, str]:
    return (story_id, card.name, json.dumps(list(card.triggers)), card.text)


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


FORMER_PLAYER = "a former player"
"""The name that replaces a forgotten user's, wherever a name is shown."""

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


ALIAS_PREFIX = "forgotten:"


def new_alias() -> str:
    return ALIAS_PREFIX + secrets.token_hex(8)


def is_alias(user_id: str | None) -> bool:
    return bool(user_id and user_id.startswith(ALIAS_PREFIX))


@dataclass(frozen=True)
class ReactionEvent:
    """One reaction added to (or removed from) a message."""

    message_id: str
    user_id: str
    emoji: str
    added: bool
    value: float = 0.0


def _chunks(items: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


# -- the audience: round-robin, messages, feedback, choices, forgetting ---------------


class AudienceStore:
    """Queries for what the audience does; mixed into `Store`, which provides the
    connection and the write transaction."""

    db: aiosqlite.Connection
    _write: Callable[..., Awaitable[aiosqlite.Cursor]]
    transaction: Callable[[], Any]

    async def players(self, story_id: int) -> list[Player]:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM players WHERE story_id = ? ORDER BY seat", (story_id,)
        )
        return [Player(r["user_id"], r["user_name"], r["seat"], bool(r["active"])) for r in rows]

    async def add_player(self, story_id: int, user_id: str, user_name: str) -> None:
        """Seat a player at the end of the order (a returning player too)."""
        async with self.transaction() as db:
            rows = await db.execute_fetchall(
                "SELECT COALESCE(MAX(seat), 0) + 1 FROM players WHERE story_id = ?", (story_id,)
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
        rows = await self.db.execute_fetchall(
            "SELECT current_seat, turn_deadline FROM stories WHERE id = ?", (story_id,)
        )
        return (rows[0][0], rows[0][1]) if rows else (None, None)

    async def overdue_turns(self, now: float) -> list[str]:
        rows = await self.db.execute_fetchall(
            "SELECT channel FROM stories WHERE status = 'active' AND mode = 'round-robin'"
            " AND turn_deadline IS NOT NULL AND turn_deadline <= ? ORDER BY turn_deadline",
            (now,),
        )
        return [r[0] for r in rows]

    async def turn_timeout(self, channel: str) -> int | None:
        rows = await self.db.execute_fetchall(
            "SELECT turn_timeout_s FROM channel_settings WHERE channel = ?", (channel,)
        )
        return rows[0][0] if rows else None

    async def set_turn_timeout(self, channel: str, seconds: int) -> None:
        await self._write(
            "INSERT INTO channel_settings (channel, turn_timeout_s) VALUES (?, ?)"
            " ON CONFLICT (channel) DO UPDATE SET turn_timeout_s = excluded.turn_timeout_s",
            (channel, seconds),
        )

    async def link_message(self, message_id: str, generation_id: int) -> bool:
        """Note that a message shows a generation. False if there is no such generation."""
        cursor = await self._write(
            "INSERT OR REPLACE INTO story_messages (message_id, generation_id)"
            " SELECT ?, id FROM generations WHERE id = ?",
            (message_id, generation_id),
        )
        return cursor.rowcount > 0

    async def generation_for_message(self, message_id: str) -> int | None:
        rows = await self.db.execute_fetchall(
            "SELECT generation_id FROM story_messages WHERE message_id = ?", (message_id,)
        )
        return rows[0][0] if rows else None

    async def set_feedback(
        self, generation_id: int, user_id: str, emoji: str, value: float, message_id: str = ""
    ) -> None:
        """One user's emoji on one message showing a generation (set, or set again)."""
        await self._write(
            "INSERT INTO feedback (generation_id, message_id, user_id, emoji, value)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id, generation_id, user_id, emoji)"
            " DO UPDATE SET value = excluded.value",
            (generation_id, message_id, user_id, emoji, value),
        )

    async def delete_feedback(
        self, generation_id: int, user_id: str, emoji: str, message_id: str | None = None
    ) -> None:
        """Take a vote back: from one message, or (None) from every message."""
        where = "" if message_id is None else " AND message_id IN (?, '')"
        await self._write(
            "DELETE FROM feedback WHERE generation_id = ? AND user_id = ? AND emoji = ?" + where,
            (generation_id, user_id, emoji, *(() if message_id is None else (message_id,))),
        )

    async def apply_reactions(self, events: Sequence[ReactionEvent]) -> list[bool]:
        """Record a batch of reaction events in one transaction, in order: each adds or
        removes one user's emoji on one message. Returns, per event, whether it counted
        (False: the message shows no generation, or the user asked to be forgotten)."""
        if not events:
            return []
        async with self.transaction() as db:
            messages = sorted({e.message_id for e in events})
            users = sorted({e.user_id for e in events})
            linked: dict[str, int] = {}
            for chunk in _chunks(messages):
                rows = await db.execute_fetchall(
                    "SELECT message_id, generation_id FROM story_messages WHERE message_id IN"
                    f" ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                linked.update({r[0]: r[1] for r in rows})
            forgotten: set[str] = set()
            for chunk in _chunks(users):
                rows = await db.execute_fetchall(
                    "SELECT user_id FROM forgotten_users WHERE user_id IN"
                    f" ({', '.join('?' * len(chunk))})",
                    chunk,
                )
                forgotten.update(r[0] for r in rows)
            # Within a batch only each vote's last event matters (added: there, with its
            # value; removed: gone), so the batch is two statements, whatever its size.
            counted, last = [], {}
            for e in events:
                generation_id = linked.get(e.message_id)
                ok = generation_id is not None and e.user_id not in forgotten
                counted.append(ok)
                if ok:
                    last[(e.message_id, generation_id, e.user_id, e.emoji)] = e
            await db.executemany(
                "INSERT INTO feedback (generation_id, message_id, user_id, emoji, value)"
                " VALUES (?, ?, ?, ?, ?) ON CONFLICT (message_id, generation_id, user_id, emoji)"
                " DO UPDATE SET value = excluded.value",
                [(g, m, u, emoji, e.value) for (m, g, u, emoji), e in last.items() if e.added],
            )
            await db.executemany(  # '' is a vote from before votes were kept per message
                "DELETE FROM feedback WHERE generation_id = ? AND user_id = ? AND emoji = ?"
                " AND message_id IN (?, '')",
                [(g, u, emoji, m) for (m, g, u, emoji), e in last.items() if not e.added],
            )
        return counted

    async def feedback(self, generation_id: int) -> list[tuple[str, str, float]]:
        """The votes on a generation: (user, emoji, value), one per user and emoji however
        many of its messages carry it."""
        rows = await self.db.execute_fetchall(
            "SELECT user_id, emoji, value FROM votes WHERE generation_id = ?"
            " ORDER BY created_at, user_id, emoji",
            (generation_id,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def create_choice(
        self, story_id: int, action: int, user_id: str | None, generation_ids: list[int]
    ) -> int:
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO choices (story_id, action, user_id) VALUES (?, ?, ?)",
                (story_id, action, user_id),
            )
            choice_id = cursor.lastrowid or 0
            await db.executemany(
                "INSERT INTO choice_options (choice_id, position, generation_id) VALUES (?, ?, ?)",
                [(choice_id, i, g) for i, g in enumerate(generation_ids, 1)],
            )
        return choice_id

    async def choice(self, choice_id: int) -> tuple[int, int, str, list[int]] | None:
        """(story_id, action, status, generation ids by position) of a choice."""
        rows = await self.db.execute_fetchall(
            "SELECT story_id, action, status FROM choices WHERE id = ?", (choice_id,)
        )
        if not rows:
            return None
        options = await self.db.execute_fetchall(
            "SELECT generation_id FROM choice_options WHERE choice_id = ? ORDER BY position",
            (choice_id,),
        )
        return rows[0][0], rows[0][1], rows[0][2], [o[0] for o in options]

    async def close_choice(self, choice_id: int, status: str) -> bool:
        """Close an open choice. False if it was not open (chosen already, or expired)."""
        cursor = await self._write(
            "UPDATE choices SET status = ? WHERE id = ? AND status = 'open'", (status, choice_id)
        )
        return cursor.rowcount > 0

    async def expire_open_choices(self, story_id: int) -> None:
        await self._write(
            "UPDATE choices SET status = 'expired' WHERE story_id = ? AND status = 'open'",
            (story_id,),
        )

    async def add_preference_pairs(
        self, chosen: int, rejected: list[int], user_id: str | None, source: str
    ) -> None:
        async with self.transaction() as db:
            await db.executemany(
                "INSERT INTO preference_pairs (chosen_generation_id, rejected_generation_id,"
                " user_id, source) VALUES (?, ?, ?, ?)",
                [(chosen, r, user_id, source) for r in rejected],
            )

    async def choices_among(self, group: list[int], user_id: str) -> set[int]:
        """The generations of `group` that a user's preference pairs name (what they have
        chosen between, among one turn's alternatives)."""
        if not group:
            return set()
        marks = ",".join("?" * len(group))
        rows = await self.db.execute_fetchall(
            "SELECT chosen_generation_id, rejected_generation_id FROM preference_pairs"
            f" WHERE user_id = ? AND chosen_generation_id IN ({marks})"
            f" AND rejected_generation_id IN ({marks})",
            (user_id, *group, *group),
        )
        return {gid for row in rows for gid in row}

    async def replace_choice(
        self, group: list[int], chosen: int, rejected: list[int], user_id: str
    ) -> None:
        """A user's preference among one turn's alternatives (`group`) is now `chosen`
        over `rejected`: their earlier pairs among them are replaced, in one transaction,
        so changing one's mind never leaves pairs that contradict each other."""
        marks = ",".join("?" * len(group))
        async with self.transaction() as db:
            await db.execute(
                "DELETE FROM preference_pairs WHERE user_id = ?"
                f" AND chosen_generation_id IN ({marks}) AND rejected_generation_id IN ({marks})",
                (user_id, *group, *group),
            )
            await db.executemany(
                "INSERT INTO preference_pairs (chosen_generation_id, rejected_generation_id,"
                " user_id, source) VALUES (?, ?, ?, 'choice')",
                [(chosen, r, user_id) for r in rejected if r != chosen],
            )

    async def import_feedback(self, rows: list[dict[str, Any]], batch: str) -> dict[str, int]:
        """Store checked feedback rows (`feedback.parse_import`) in one transaction: each
        original story becomes an ended story of the operator's own (trainable, keeping
        its examples on one side of the train/held-out split), each text a generation,
        each pair a preference and each label one vote of an import user of its own (so
        the per-user caps do not shrink them)."""
        stories: dict[str, int] = {}
        counts = {"pairs": 0, "labels": 0, "stories": 0}
        async with self.transaction() as db:

            async def generation(story_id: int, prompt: str, output: str) -> int:
                cursor = await db.execute(
                    "INSERT INTO generations (story_id, channel, prompt, output, raw_output,"
                    " params, model_id, adapter_id, prompt_tokens, output_tokens,"
                    " finish_reason, latency_s, ttft_s) VALUES"
                    " (?, NULL, ?, ?, ?, '{}', 'import', NULL, 0, 0, 'eos', 0, NULL)",
                    (story_id, prompt, output, output),
                )
                return int(cursor.lastrowid or 0)

            for number, row in enumerate(rows):
                if row["group"] not in stories:
                    cursor = await db.execute(
                        "INSERT INTO stories (channel, premise, mode, status, created_by,"
                        " ended_at) VALUES (?, ?, 'solo', 'ended', NULL,"
                        " strftime('%Y-%m-%dT%H:%M:%fZ', 'now'))",
                        (f"import:{batch}:{row['group']}", row["prompt"][:1000]),
                    )
                    stories[row["group"]] = int(cursor.lastrowid or 0)
                story_id = stories[row["group"]]
                if row["type"] == "pair":
                    chosen = await generation(story_id, row["prompt"], row["chosen"])
                    rejected = await generation(story_id, row["prompt"], row["rejected"])
                    await db.execute(
                        "INSERT INTO preference_pairs (chosen_generation_id,"
                        " rejected_generation_id, user_id, source) VALUES (?, ?, ?, ?)",
                        (chosen, rejected, f"import:{batch}:{number}", row["source"]),
                    )
                    counts["pairs"] += 1
                else:
                    made = await generation(story_id, row["prompt"], row["completion"])
                    await db.execute(
                        "INSERT INTO feedback (generation_id, message_id, user_id, emoji, value)"
                        " VALUES (?, 'import', ?, ?, ?)",
                        (
                            made,
                            f"import:{batch}:{number}",
                            "👍" if row["label"] else "👎",
                            1.0 if row["label"] else -1.0,
                        ),
                    )
                    counts["labels"] += 1
        counts["stories"] = len(stories)
        return counts

    async def preference_pairs(self) -> list[tuple[int, int, str | None, str]]:
        rows = await self.db.execute_fetchall(
            "SELECT chosen_generation_id, rejected_generation_id, user_id, source"
            " FROM preference_pairs ORDER BY id"
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def is_forgotten(self, user_id: str) -> bool:
        rows = await self.db.execute_fetchall(
            "SELECT 1 FROM forgotten_users WHERE user_id = ?", (user_id,)
        )
        return bool(rows)

    async def forgotten_alias(self, user_id: str) -> str | None:
        """The alias that stands for a forgotten user, or None if they are not."""
        rows = await self.db.execute_fetchall(
            "SELECT alias FROM forgotten_users WHERE user_id = ?", (user_id,)
        )
        return rows[0][0] if rows else None

    async def forget_user(self, user_id: str) -> tuple[int, int, int]:
        """Delete the user's reactions and preferences; everywhere else their id becomes
        their alias and their name goes (`USER_COLUMNS` lists every column that can hold
        either; a test keeps the list complete). Their lines stay in shared stories,
        anonymised and excluded from training. Remember the id, so nothing of theirs is
        recorded again and what they do later is stored under the alias."""
        async with self.transaction() as db:
            rows = await db.execute_fetchall(
                "SELECT alias FROM forgotten_users WHERE user_id = ?", (user_id,)
            )
            alias = rows[0][0] if rows else new_alias()
            await db.execute(
                "INSERT OR IGNORE INTO forgotten_users (user_id, alias) VALUES (?, ?)",
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
            "companion_offers": rows(
                await q(
                    "SELECT c.id AS choice_id, c.story_id, c.status, c.created_at,"
                    " (SELECT json_group_array(g.output) FROM choice_options o"
                    "  JOIN generations g ON g.id = o.generation_id WHERE o.choice_id = c.id)"
                    " AS options FROM choices c WHERE c.user_id IN (?, ?) ORDER BY c.id",
                    ids,
                )
            ),
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

    # -- learning: opt-in per community, and what feedback came in ----------------

    async def learning_enabled(self, community: str) -> bool:
        rows = await self.db.execute_fetchall(
            "SELECT learning FROM communities WHERE id = ?", (community,)
        )
        return bool(rows and rows[0][0])

    async def set_learning(self, community: str, enabled: bool, updated_by: str | None) -> None:
        await self._write(
            "INSERT INTO communities (id, learning, updated_by) VALUES (?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET learning = excluded.learning,"
            " updated_by = excluded.updated_by,"
            " updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            (community, int(enabled), updated_by),
        )

    async def trainable_story_ids(self) -> set[int]:
        """Stories that may be trained on: told outside any community (the operator's
        own, through the CLI or the library), or in a community whose learning is on."""
        rows = await self.db.execute_fetchall(f"SELECT s.id FROM stories s WHERE {TRAINABLE_STORY}")
        return {r[0] for r in rows}

    async def new_feedback_count(self, since: str | None, community: str | None = None) -> int:
        """Reactions (non-neutral) and companion choices on trainable stories recorded
        after `since` (a timestamp as the database writes them; None: ever): on one
        community's stories, or (None) on all of them."""
        since = since or ""
        only = " AND s.community = ?" if community is not None else ""
        extra = (community,) if community is not None else ()
        rows = await self.db.execute_fetchall(
            "SELECT (SELECT COUNT(*) FROM votes f JOIN generations g ON g.id = f.generation_id"
            f" JOIN stories s ON s.id = g.story_id WHERE f.value != 0 AND f.created_at > ?"
            f" AND {TRAINABLE_STORY}{only})"
            " + (SELECT COUNT(*) FROM choices c JOIN stories s ON s.id = c.story_id"
            f" WHERE c.status = 'chosen' AND c.created_at > ? AND {TRAINABLE_STORY}{only})",
            (since, *extra, since, *extra),
        )
        return int(rows[0][0])

    async def learning_communities(self) -> list[str]:
        """The communities whose learning is on."""
        rows = await self.db.execute_fetchall(
            "SELECT id FROM communities WHERE learning = 1 ORDER BY id"
        )
        return [r[0] for r in rows]

    async def feedback_stats(self, community: str | None) -> list[dict[str, Any]]:
        """Per adapter version (None: the base model): the generations shown, how many
        got a reaction, 👍-style and 👎-style votes, and the approval rate
        liked / (liked + disliked). Limited to one community's stories when given."""
        where, params = ("WHERE s.community = ?", (community,)) if community else ("", ())
        rows = await self.db.execute_fetchall(
            "SELECT g.adapter_id AS adapter, COUNT(DISTINCT g.id) AS generations,"
            " COUNT(DISTINCT f.generation_id) AS reacted,"
            " COALESCE(SUM(f.value > 0), 0) AS liked, COALESCE(SUM(f.value < 0), 0) AS disliked"
            " FROM generations g JOIN stories s ON s.id = g.story_id"
            f" LEFT JOIN votes f ON f.generation_id = g.id {where}"
            " GROUP BY g.adapter_id ORDER BY MIN(g.id)",
            params,
        )
        out = []
        for r in rows:
            votes = r["liked"] + r["disliked"]
            out.append({**dict(r), "approval": r["liked"] / votes if votes else None})
        return out

    # -- training runs ------------------------------------------------------------

    async def interrupt_training_runs(self) -> None:
        """Mark runs still 'running' as failed: call it holding the round lock, when
        any such run was killed."""
        await self._write(
            "UPDATE training_runs SET status = 'failed', error = 'interrupted',"
            " finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE status = 'running'"
        )

    async def start_training_run(self, method: str, community: str | None = None) -> int:
        """A run of `community`'s lineage (None: the shared one) starts."""
        cursor = await self._write(
            "INSERT INTO training_runs (method, community) VALUES (?, ?)", (method, community)
        )
        return int(cursor.lastrowid or 0)

    async def fail_training_run(self, run_id: int, exc: BaseException) -> None:
        """Record what stopped the run: its message, or its type when it has none."""
        await self._write(
            "UPDATE training_runs SET status = 'failed', error = ?,"
            " finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
            ((str(exc) or type(exc).__name__)[:500], run_id),
        )

    async def finish_training_run(
        self,
        run_id: int,
        *,
        version: int | None,
        error: str | None = None,
        data_until: int | None = None,
    ) -> None:
        await self._write(
            "UPDATE training_runs SET status = 'done', version = ?, error = ?, data_until = ?,"
            " finished_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE id = ?",
            (version, error, data_until, run_id),
        )

    async def set_training_run_version(
        self, run_id: int, version: int, data_until: int | None
    ) -> None:
        """Note on a running run the version it registered and the newest generation its
        data came from, as soon as the version exists: a run killed after that still
        keeps the next round from learning the same feedback again."""
        await self._write(
            "UPDATE training_runs SET version = ?, data_until = ? WHERE id = ?",
            (version, data_until, run_id),
        )

    async def last_training_start(self, community: str | None = None) -> str | None:
        """When the newest training run of a lineage started (a community's own, or
        None: the shared one), as the database writes times."""
        rows = await self.db.execute_fetchall(
            "SELECT MAX(started_at) FROM training_runs"
            " WHERE COALESCE(community, '') = COALESCE(?, '')",
            (community,),
        )
        return rows[0][0]

    # -- reward models (a lineage per community; NULL: the shared one) ------------

    async def add_reward_model(
        self,
        version: int,
        path: str,
        *,
        community: str | None,
        metrics: dict[str, Any],
        data_counts: dict[str, Any],
    ) -> None:
        await self._write(
            "INSERT INTO reward_models (version, community, path, metrics, data_counts)"
            " VALUES (?, ?, ?, ?, ?)",
            (version, community, path, json.dumps(metrics), json.dumps(data_counts)),
        )

    async def reward_model(self, version: int) -> dict[str, Any] | None:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM reward_models WHERE version = ?", (version,)
        )
        return _reward_row(rows[0]) if rows else None

    async def reward_models(self) -> list[dict[str, Any]]:
        """Every reward model version, of every lineage, oldest first."""
        rows = await self.db.execute_fetchall("SELECT * FROM reward_models ORDER BY version")
        return [_reward_row(r) for r in rows]

    async def promoted_reward_model(self, community: str | None) -> dict[str, Any] | None:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM reward_models WHERE status = 'promoted'"
            " AND COALESCE(community, '') = COALESCE(?, '')",
            (community,),
        )
        return _reward_row(rows[0]) if rows else None

    async def newest_reward_model_version(self) -> int:
        rows = await self.db.execute_fetchall("SELECT COALESCE(MAX(version), 0) FROM reward_models")
        return int(rows[0][0])

    async def promote_reward_model(self, version: int) -> None:
        """Promote `version` in its lineage; the one promoted there before is retired.
        One transaction."""
        async with self.transaction() as db:
            await db.execute(
                "UPDATE reward_models SET status = 'retired' WHERE status = 'promoted'"
                " AND COALESCE(community, '') ="
                " (SELECT COALESCE(community, '') FROM reward_models WHERE version = ?)",
                (version,),
            )
            await db.execute(
                "UPDATE reward_models SET status = 'promoted',"
                " promoted_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now') WHERE version = ?",
                (version,),
            )

    async def reject_reward_model(self, version: int) -> None:
        await self._write(
            "UPDATE reward_models SET status = 'rejected'"
            " WHERE version = ? AND status = 'candidate'",
            (version,),
        )

    async def rollback_reward_model(self, community: str | None) -> int | None:
        """Reject the lineage's promoted version and promote the one promoted before it
        (the most recently promoted retired one). Returns the version promoted now (None:
        none). One transaction; nothing changes when none is promoted."""
        async with self.transaction() as db:
            same = "COALESCE(community, '') = COALESCE(?, '')"
            current = await db.execute_fetchall(
                f"SELECT version FROM reward_models WHERE status = 'promoted' AND {same}",
                (community,),
            )
            if not current:
                return None
            await db.execute(
                "UPDATE reward_models SET status = 'rejected' WHERE version = ?",
                (current[0][0],),
            )
            before = await db.execute_fetchall(
                "SELECT version FROM reward_models WHERE status = 'retired'"
                f" AND promoted_at IS NOT NULL AND {same} ORDER BY promoted_at DESC LIMIT 1",
                (community,),
            )
            if before:
                await db.execute(
                    "UPDATE reward_models SET status = 'promoted' WHERE version = ?",
                    (before[0][0],),
                )
        return before[0][0] if before else None


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


TRAINABLE_STORY = (
    "(s.community IS NULL OR s.community IN (SELECT id FROM communities WHERE learning = 1))"
)


class Store(AudienceStore):
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

    async def open(self, *, migrate: bool = True, create: bool = True) -> Store:
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
        rows = await self.db.execute_fetchall("SELECT version, name FROM schema_migrations")
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

    # -- migrations ---------------------------------------------------------------

    async def migration_status(self) -> list[MigrationStatus]:
        rows = await self.db.execute_fetchall("SELECT version, applied_at FROM schema_migrations")
        applied = {r["version"]: r["applied_at"] for r in rows}
        return [
            MigrationStatus(m.version, m.name, applied.get(m.version)) for m in load_migrations()
        ]

    async def schema_version(self) -> int:
        """The newest migration applied (0 for an empty database)."""
        status = await self.migration_status()
        return max((m.version for m in status if m.applied_at), default=0)

    async def story_count(self) -> int:
        rows = await self.db.execute_fetchall("SELECT COUNT(*) FROM stories")
        return int(rows[0][0])

    async def ping(self) -> bool:
        """One trivial query answered."""
        rows = await self.db.execute_fetchall("SELECT 1")
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

    # -- stories ------------------------------------------------------------------

    async def create_story(
        self,
        channel: str,
        premise: str,
        *,
        genre: str | None,
        mode: str,
        created_by: str | None,
        community: str | None = None,
    ) -> Story:
        cursor = await self._write(
            "INSERT INTO stories (channel, premise, genre, mode, created_by, community)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (channel, premise, genre, mode, created_by, community),
        )
        story = await self.story(cursor.lastrowid or 0)
        assert story is not None
        return story

    async def import_story(
        self,
        channel: str,
        saved: SavedStory,
        *,
        loaded_by: str,
        community: str | None,
    ) -> Story:
        """A saved story (checked and cleaned) started in `channel`, all in one
        transaction: nothing half-loaded. Its lines belong to whoever loads it (their id,
        the saved display names) and, like its replies (no generation records), are never
        trained on."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "INSERT INTO stories (channel, premise, genre, mode, created_by, community,"
                " memory, authors_note) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    channel,
                    saved.premise,
                    saved.genre,
                    saved.mode,
                    loaded_by,
                    community,
                    saved.memory,
                    saved.authors_note,
                ),
            )
            story_id = int(cursor.lastrowid or 0)
            rows = []
            for position, turn in enumerate(saved.turns, start=1):
                user = turn.kind == "user"
                author = (loaded_by, turn.author) if user else (None, None)
                # Alternatives first (replaced), then the turn itself: ids keep the order.
                rows += [
                    (story_id, position, position, "bot", None, None, text, 1, "replaced")
                    for text in turn.alternatives
                ]
                shown = (story_id, position, position, turn.kind, *author, turn.text, 1, "active")
                rows.append(shown)
            await db.executemany(
                "INSERT INTO turns (story_id, position, action, kind, author_id, author_name,"
                " text, train_excluded, status) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                rows,
            )
            await db.executemany(_UPSERT_LORE, [_lore_row(story_id, c) for c in saved.lore])
            await db.execute(
                "INSERT INTO channel_settings (channel, preset, sampling) VALUES (?, ?, ?)"
                " ON CONFLICT (channel) DO UPDATE SET preset = excluded.preset,"
                " sampling = excluded.sampling",
                (channel, saved.preset, json.dumps(saved.sampling)),
            )
        story = await self.story(story_id)
        assert story is not None
        return story

    async def story(self, story_id: int) -> Story | None:
        rows = await self.db.execute_fetchall("SELECT * FROM stories WHERE id = ?", (story_id,))
        return _story(rows[0]) if rows else None

    async def active_story(self, channel: str) -> Story | None:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM stories WHERE channel = ? AND status = 'active'", (channel,)
        )
        return _story(rows[0]) if rows else None

    async def latest_story(self, channel: str) -> Story | None:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM stories WHERE channel = ? ORDER BY id DESC LIMIT 1", (channel,)
        )
        return _story(rows[0]) if rows else None

    async def active_stories(self) -> list[Story]:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM stories WHERE status = 'active' ORDER BY id"
        )
        return [_story(r) for r in rows]

    async def update_story(self, story_id: int, **fields: Any) -> None:
        allowed = {"memory", "authors_note", "genre"}
        if not fields or not set(fields) <= allowed:
            raise ValueError(f"cannot update {sorted(fields)}")
        assignments = ", ".join(f"{k} = ?" for k in fields)
        await self._write(
            f"UPDATE stories SET {assignments} WHERE id = ?", (*fields.values(), story_id)
        )

    async def end_story(self, story_id: int) -> None:
        await self._write(
            "UPDATE stories SET status = 'ended', ended_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')"
            " WHERE id = ?",
            (story_id,),
        )

    # -- turns --------------------------------------------------------------------

    async def next_action(self, story_id: int) -> int:
        rows = await self.db.execute_fetchall(
            "SELECT COALESCE(MAX(action), 0) + 1 FROM turns WHERE story_id = ?", (story_id,)
        )
        return int(rows[0][0])

    async def add_turn(
        self,
        story_id: int,
        *,
        action: int,
        kind: str,
        text: str,
        author_id: str | None = None,
        author_name: str | None = None,
        generation_id: int | None = None,
        position: int | None = None,
        replacing: int | None = None,
        train_excluded: bool = False,
        status: str = "active",
    ) -> Turn:
        """Append a turn. Positions are never reused (undone turns keep theirs); with
        `replacing`, the new turn takes that turn's place and the old one is marked
        replaced, in one transaction."""
        async with self.transaction() as db:
            if position is None:
                rows = await db.execute_fetchall(
                    "SELECT COALESCE(MAX(position), 0) + 1 FROM turns WHERE story_id = ?",
                    (story_id,),
                )
                position = int(rows[0][0])
            if replacing is not None:
                await db.execute("UPDATE turns SET status = 'replaced' WHERE id = ?", (replacing,))
            cursor = await db.execute(
                "INSERT INTO turns (story_id, position, action, kind, author_id, author_name,"
                " text, generation_id, train_excluded, status)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                (
                    story_id,
                    position,
                    action,
                    kind,
                    author_id,
                    author_name,
                    text,
                    generation_id,
                    int(train_excluded),
                    status,
                ),
            )
        turn = await self.turn(cursor.lastrowid or 0)
        assert turn is not None
        return turn

    async def turn(self, turn_id: int) -> Turn | None:
        rows = await self.db.execute_fetchall("SELECT * FROM turns WHERE id = ?", (turn_id,))
        return _turn(rows[0]) if rows else None

    async def active_turns(self, story_id: int) -> list[Turn]:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM turns WHERE story_id = ? AND status = 'active' ORDER BY position, id",
            (story_id,),
        )
        return [_turn(r) for r in rows]

    async def alternatives(self, story_id: int, position: int) -> list[Turn]:
        """Bot turns written for one position (the retry stack), oldest first."""
        rows = await self.db.execute_fetchall(
            "SELECT * FROM turns WHERE story_id = ? AND position = ? AND kind = 'bot'"
            " AND status IN ('active', 'replaced') ORDER BY id",
            (story_id, position),
        )
        return [_turn(r) for r in rows]

    async def next_best_candidate(self, turn: Turn) -> Turn | None:
        """Of the best-of-n candidates written with `turn`, the best one the reward
        model scored below it (what a retry shows next), or None."""
        if turn.generation_id is None:
            return None
        rows = await self.db.execute_fetchall(
            "SELECT t.* FROM turns t JOIN generations g ON g.id = t.generation_id"
            " JOIN generations shown ON shown.id = ?"
            " WHERE t.story_id = ? AND t.position = ? AND t.kind = 'bot'"
            " AND t.status = 'replaced' AND g.candidate_of = shown.candidate_of"
            " AND g.reward < shown.reward ORDER BY g.reward DESC LIMIT 1",
            (turn.generation_id, turn.story_id, turn.position),
        )
        return _turn(rows[0]) if rows else None

    async def undo_action(self, story_id: int, action: int) -> None:
        """Mark every turn of `action` undone, its retry alternatives included."""
        await self._write(
            "UPDATE turns SET status = 'undone' WHERE story_id = ? AND action = ?"
            " AND status IN ('active', 'replaced')",
            (story_id, action),
        )

    async def swap_active(self, old_id: int, new_id: int) -> None:
        """Make `new_id` the active turn in place of `old_id`, atomically."""
        async with self.transaction() as db:
            await db.execute("UPDATE turns SET status = 'replaced' WHERE id = ?", (old_id,))
            await db.execute("UPDATE turns SET status = 'active' WHERE id = ?", (new_id,))

    # -- lore ---------------------------------------------------------------------

    async def upsert_lore(self, story_id: int, card: LoreCard) -> None:
        await self._write(_UPSERT_LORE, _lore_row(story_id, card))

    async def import_lore(self, story_id: int, cards: list[LoreCard], memory: str | None) -> None:
        """Lore cards (added, or replacing cards of the same name) and, with `memory`, the
        story's memory, in one transaction: an import lands whole or not at all."""
        async with self.transaction() as db:
            await db.executemany(_UPSERT_LORE, [_lore_row(story_id, c) for c in cards])
            if memory is not None:
                await db.execute("UPDATE stories SET memory = ? WHERE id = ?", (memory, story_id))

    async def lore(self, story_id: int) -> list[LoreCard]:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM lore_cards WHERE story_id = ? ORDER BY id", (story_id,)
        )
        return [
            LoreCard(r["name"], tuple(json.loads(r["triggers"])), r["text"], id=r["id"])
            for r in rows
        ]

    async def remove_lore(self, story_id: int, name: str) -> bool:
        cursor = await self._write(
            "DELETE FROM lore_cards WHERE story_id = ? AND name = ? COLLATE NOCASE",
            (story_id, name),
        )
        return cursor.rowcount > 0

    # -- generations --------------------------------------------------------------

    async def record_generation(
        self,
        *,
        story_id: int | None,
        channel: str | None,
        prompt: str,
        output: str,
        raw_output: str,
        params: dict[str, Any],
        model_id: str,
        adapter_id: str | None,
        prompt_tokens: int,
        output_tokens: int,
        finish_reason: str,
        latency_s: float,
        ttft_s: float | None,
        reward: float | None = None,
        candidate_of: int | None = None,
    ) -> int:
        """A generation as the model wrote it and as it was shown (`output`; empty when
        nothing was shown). `reward`: the reward model's score, for best-of-n candidates,
        which share `candidate_of` (the id of the one shown)."""
        cursor = await self._write(
            "INSERT INTO generations (story_id, channel, prompt, output, raw_output, params,"
            " model_id, adapter_id, prompt_tokens, output_tokens, finish_reason, latency_s, ttft_s,"
            " reward, candidate_of) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            (
                story_id,
                channel,
                prompt,
                output,
                raw_output,
                json.dumps(params),
                model_id,
                adapter_id,
                prompt_tokens,
                output_tokens,
                finish_reason,
                latency_s,
                ttft_s,
                reward,
                candidate_of,
            ),
        )
        return cursor.lastrowid or 0

    async def set_candidate_group(self, generation_ids: list[int], shown: int) -> None:
        """Mark best-of-n candidates as one group, named by the one shown."""
        await self._write(
            "UPDATE generations SET candidate_of = ? WHERE id IN"
            f" ({', '.join('?' * len(generation_ids))})",
            (shown, *generation_ids),
        )

    async def generation(self, generation_id: int) -> dict[str, Any] | None:
        rows = await self.db.execute_fetchall(
            "SELECT * FROM generations WHERE id = ?", (generation_id,)
        )
        if not rows:
            return None
        record = dict(rows[0])
        record["params"] = json.loads(record["params"])
        return record

    # -- channel settings ---------------------------------------------------------

    async def channel_settings(self, channel: str) -> tuple[str | None, dict[str, Any]]:
        rows = await self.db.execute_fetchall(
            "SELECT preset, sampling FROM channel_settings WHERE channel = ?", (channel,)
        )
        if not rows:
            return None, {}
        return rows[0]["preset"], json.loads(rows[0]["sampling"])

    async def set_channel_settings(
        self, channel: str, preset: str | None, sampling: dict[str, Any]
    ) -> None:
        await self._write(
            "INSERT INTO channel_settings (channel, preset, sampling) VALUES (?, ?, ?)"
            " ON CONFLICT (channel) DO UPDATE SET preset = excluded.preset,"
            " sampling = excluded.sampling,"
            " updated_at = strftime('%Y-%m-%dT%H:%M:%fZ', 'now')",
            (channel, preset, json.dumps(sampling)),
        )


def _story(row: aiosqlite.Row) -> Story:
    return Story(
        id=row["id"],
        channel=row["channel"],
        premise=row["premise"],
        genre=row["genre"],
        mode=row["mode"],
        status=row["status"],
        memory=row["memory"],
        authors_note=row["authors_note"],
        created_by=row["created_by"],
        community=row["community"],
        created_at=row["created_at"],
        ended_at=row["ended_at"],
    )


def _turn(row: aiosqlite.Row) -> Turn:
    return Turn(
        id=row["id"],
        story_id=row["story_id"],
        position=row["position"],
        action=row["action"],
        kind=row["kind"],
        author_id=row["author_id"],
        author_name=row["author_name"],
        text=row["text"],
        status=row["status"],
        generation_id=row["generation_id"],
    )


def _reward_row(row: aiosqlite.Row) -> dict[str, Any]:
    record = dict(row)
    record["metrics"] = json.loads(record["metrics"])
    record["data_counts"] = json.loads(record["data_counts"])
    return record
