"""Stories, their turns (with alternatives), lore cards and channel settings."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from ..records import LoreCard, Story, Turn
from .database import Repository, inserted_id, utc_now

if TYPE_CHECKING:
    from ..saves import SavedStory


_UPSERT_LORE = (
    "INSERT INTO lore_cards (story_id, name, triggers, text) VALUES (?, ?, ?, ?)"
    " ON CONFLICT (story_id, name) DO UPDATE SET triggers = excluded.triggers,"
    " text = excluded.text"
)
"""A lore card added, or replacing the story's card of the same name."""


def _lore_row(story_id: int, card: Any) -> tuple[int, str, str, str]:
    return (story_id, card.name, json.dumps(list(card.triggers)), card.text)


class StoryRepository(Repository):
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
        story_id = await self._insert(
            "INSERT INTO stories (channel, premise, genre, mode, created_by, community)"
            " VALUES (?, ?, ?, ?, ?, ?)",
            (channel, premise, genre, mode, created_by, community),
        )
        story = await self.story(story_id)
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
            story_id = await inserted_id(
                db,
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
        rows = await self.fetch("SELECT * FROM stories WHERE id = ?", (story_id,))
        return _story(rows[0]) if rows else None

    async def active_story(self, channel: str) -> Story | None:
        rows = await self.fetch(
            "SELECT * FROM stories WHERE channel = ? AND status = 'active'", (channel,)
        )
        return _story(rows[0]) if rows else None

    async def latest_story(self, channel: str) -> Story | None:
        rows = await self.fetch(
            "SELECT * FROM stories WHERE channel = ? ORDER BY id DESC LIMIT 1", (channel,)
        )
        return _story(rows[0]) if rows else None

    async def active_stories(self) -> list[Story]:
        rows = await self.fetch("SELECT * FROM stories WHERE status = 'active' ORDER BY id")
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
            "UPDATE stories SET status = 'ended', ended_at = ? WHERE id = ?",
            (utc_now(), story_id),
        )

    async def story_count(self) -> int:
        rows = await self.fetch("SELECT COUNT(*) FROM stories")
        return int(rows[0][0])

    async def next_action(self, story_id: int) -> int:
        rows = await self.fetch(
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
                rows = list(
                    await db.execute_fetchall(
                        "SELECT COALESCE(MAX(position), 0) + 1 FROM turns WHERE story_id = ?",
                        (story_id,),
                    )
                )
                position = int(rows[0][0])
            if replacing is not None:
                await db.execute("UPDATE turns SET status = 'replaced' WHERE id = ?", (replacing,))
            turn_id = await inserted_id(
                db,
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
        turn = await self.turn(turn_id)
        assert turn is not None
        return turn

    async def turn(self, turn_id: int) -> Turn | None:
        rows = await self.fetch("SELECT * FROM turns WHERE id = ?", (turn_id,))
        return _turn(rows[0]) if rows else None

    async def active_turns(self, story_id: int) -> list[Turn]:
        rows = await self.fetch(
            "SELECT * FROM turns WHERE story_id = ? AND status = 'active' ORDER BY position, id",
            (story_id,),
        )
        return [_turn(r) for r in rows]

    async def alternatives(self, story_id: int, position: int) -> list[Turn]:
        """Bot turns written for one position (the retry stack), oldest first."""
        rows = await self.fetch(
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
        rows = await self.fetch(
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
        rows = await self.fetch(
            "SELECT * FROM lore_cards WHERE story_id = ? ORDER BY id", (story_id,)
        )
        return [
            LoreCard(r["name"], tuple(json.loads(r["triggers"])), r["text"], id=r["id"])
            for r in rows
        ]

    async def remove_lore(self, story_id: int, name: str) -> bool:
        cursor = await self._write(
            "DELETE FROM lore_cards WHERE story_id = ? AND lower(name) = lower(?)",
            (story_id, name),
        )
        return cursor.rowcount > 0

    async def channel_settings(self, channel: str) -> tuple[str | None, dict[str, Any]]:
        rows = await self.fetch(
            "SELECT preset, sampling FROM channel_settings WHERE channel = ?", (channel,)
        )
        if not rows:
            return None, {}
        return rows[0]["preset"], json.loads(rows[0]["sampling"])

    async def set_channel_settings(
        self, channel: str, preset: str | None, sampling: dict[str, Any]
    ) -> None:
        await self._write(
            "INSERT INTO channel_settings (channel, preset, sampling, updated_at)"
            " VALUES (?, ?, ?, ?) ON CONFLICT (channel) DO UPDATE SET preset = excluded.preset,"
            " sampling = excluded.sampling, updated_at = excluded.updated_at",
            (channel, preset, json.dumps(sampling), utc_now()),
        )


def _story(row: Any) -> Story:
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


def _turn(row: Any) -> Turn:
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
