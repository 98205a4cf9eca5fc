"""What the audience gives: generations and the messages that show them, reactions,
choices and preference pairs, and each community's learning switch."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from .database import Repository, inserted_id, utc_now
from .interfaces import ReactionEvent

log = logging.getLogger(__name__)


def _chunks(items: Sequence[str], size: int = 500) -> list[Sequence[str]]:
    return [items[i : i + size] for i in range(0, len(items), size)]


TRAINABLE_STORY = (
    "(s.community IS NULL OR s.community IN (SELECT id FROM communities WHERE learning = 1))"
)


_LIKED = "SUM(CASE WHEN f.value > 0 THEN 1 ELSE 0 END)"
_DISLIKED = "SUM(CASE WHEN f.value < 0 THEN 1 ELSE 0 END)"
_NEUTRAL = "SUM(CASE WHEN f.value = 0 THEN 1 ELSE 0 END)"
"""Votes counted by kind (`f`: the votes), in SQL both stores speak."""


class FeedbackRepository(Repository):
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
        return await self._insert(
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

    async def set_candidate_group(self, generation_ids: list[int], shown: int) -> None:
        """Mark best-of-n candidates as one group, named by the one shown."""
        await self._write(
            "UPDATE generations SET candidate_of = ? WHERE id IN"
            f" ({', '.join('?' * len(generation_ids))})",
            (shown, *generation_ids),
        )

    async def generation(self, generation_id: int) -> dict[str, Any] | None:
        rows = await self.fetch("SELECT * FROM generations WHERE id = ?", (generation_id,))
        if not rows:
            return None
        record = dict(rows[0])
        record["params"] = json.loads(record["params"])
        return record

    async def link_message(self, message_id: str, generation_id: int) -> bool:
        """Note that a message shows a generation. False if there is no such generation."""
        cursor = await self._write(
            "INSERT INTO story_messages (message_id, generation_id)"
            " SELECT ?, id FROM generations WHERE id = ?"
            " ON CONFLICT (message_id) DO UPDATE SET generation_id = excluded.generation_id,"
            " created_at = excluded.created_at",
            (message_id, generation_id),
        )
        return cursor.rowcount > 0

    async def generation_for_message(self, message_id: str) -> int | None:
        rows = await self.fetch(
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
                rows = list(
                    await db.execute_fetchall(
                        "SELECT message_id, generation_id FROM story_messages WHERE message_id IN"
                        f" ({', '.join('?' * len(chunk))})",
                        chunk,
                    )
                )
                linked.update({r[0]: r[1] for r in rows})
            forgotten: set[str] = set()
            for chunk in _chunks(users):
                rows = list(
                    await db.execute_fetchall(
                        "SELECT user_id FROM forgotten_users WHERE user_id IN"
                        f" ({', '.join('?' * len(chunk))})",
                        chunk,
                    )
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
        rows = await self.fetch(
            "SELECT user_id, emoji, value FROM votes WHERE generation_id = ?"
            " ORDER BY created_at, user_id, emoji",
            (generation_id,),
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def create_choice(
        self, story_id: int, action: int, user_id: str | None, generation_ids: list[int]
    ) -> int:
        async with self.transaction() as db:
            choice_id = await inserted_id(
                db,
                "INSERT INTO choices (story_id, action, user_id) VALUES (?, ?, ?)",
                (story_id, action, user_id),
            )
            await db.executemany(
                "INSERT INTO choice_options (choice_id, position, generation_id) VALUES (?, ?, ?)",
                [(choice_id, i, g) for i, g in enumerate(generation_ids, 1)],
            )
        return choice_id

    async def choice(self, choice_id: int) -> tuple[int, int, str, list[int]] | None:
        """(story_id, action, status, generation ids by position) of a choice."""
        rows = await self.fetch(
            "SELECT story_id, action, status FROM choices WHERE id = ?", (choice_id,)
        )
        if not rows:
            return None
        options = await self.fetch(
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
        rows = await self.fetch(
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
                return await inserted_id(
                    db,
                    "INSERT INTO generations (story_id, channel, prompt, output, raw_output,"
                    " params, model_id, adapter_id, prompt_tokens, output_tokens,"
                    " finish_reason, latency_s, ttft_s) VALUES"
                    " (?, NULL, ?, ?, ?, '{}', 'import', NULL, 0, 0, 'eos', 0, NULL)",
                    (story_id, prompt, output, output),
                )

            for number, row in enumerate(rows):
                if row["group"] not in stories:
                    stories[row["group"]] = await inserted_id(
                        db,
                        "INSERT INTO stories (channel, premise, mode, status, created_by,"
                        " ended_at) VALUES (?, ?, 'solo', 'ended', NULL, ?)",
                        (f"import:{batch}:{row['group']}", row["prompt"][:1000], utc_now()),
                    )
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
        rows = await self.fetch(
            "SELECT chosen_generation_id, rejected_generation_id, user_id, source"
            " FROM preference_pairs ORDER BY id"
        )
        return [(r[0], r[1], r[2], r[3]) for r in rows]

    async def learning_enabled(self, community: str) -> bool:
        rows = await self.fetch("SELECT learning FROM communities WHERE id = ?", (community,))
        return bool(rows and rows[0][0])

    async def set_learning(self, community: str, enabled: bool, updated_by: str | None) -> None:
        await self._write(
            "INSERT INTO communities (id, learning, updated_by, updated_at) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (id) DO UPDATE SET learning = excluded.learning,"
            " updated_by = excluded.updated_by, updated_at = excluded.updated_at",
            (community, int(enabled), updated_by, utc_now()),
        )

    async def trainable_story_ids(self) -> set[int]:
        """Stories that may be trained on: told outside any community (the operator's
        own, through the CLI or the library), or in a community whose learning is on."""
        rows = await self.fetch(f"SELECT s.id FROM stories s WHERE {TRAINABLE_STORY}")
        return {r[0] for r in rows}

    async def new_feedback_count(self, since: str | None, community: str | None = None) -> int:
        """Reactions (non-neutral) and companion choices on trainable stories recorded
        after `since` (a timestamp as the database writes them; None: ever): on one
        community's stories, or (None) on all of them."""
        since = since or ""
        only = " AND s.community = ?" if community is not None else ""
        extra = (community,) if community is not None else ()
        rows = await self.fetch(
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
        rows = await self.fetch("SELECT id FROM communities WHERE learning = 1 ORDER BY id")
        return [r[0] for r in rows]

    async def feedback_stats(self, community: str | None) -> list[dict[str, Any]]:
        """Per adapter version (None: the base model): the generations shown, how many
        got a reaction, 👍-style and 👎-style votes, and the approval rate
        liked / (liked + disliked). Limited to one community's stories when given."""
        where, params = ("WHERE s.community = ?", (community,)) if community else ("", ())
        rows = await self.fetch(
            "SELECT g.adapter_id AS adapter, COUNT(DISTINCT g.id) AS generations,"
            " COUNT(DISTINCT f.generation_id) AS reacted,"
            f" COALESCE({_LIKED}, 0) AS liked, COALESCE({_DISLIKED}, 0) AS disliked"
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

    # -- what training reads ---------------------------------------------------------

    async def trainable_generations(
        self, community: str | None, *, scored_candidates: bool = False
    ) -> dict[int, dict[str, Any]]:
        """Finished generations of stories that may be trained on (consent), by id, of
        one community or (None) of all. `scored_candidates`: only best-of-n candidates
        the reward model scored, with their `reward` and group (`grp`, the id of the one
        shown)."""
        columns = where = ""
        if scored_candidates:
            columns = ", g.reward, COALESCE(g.candidate_of, g.id) AS grp"
            where = (
                " AND g.reward IS NOT NULL AND (g.candidate_of IS NOT NULL OR g.id IN"
                " (SELECT candidate_of FROM generations WHERE candidate_of IS NOT NULL))"
            )
        if community is not None:
            where += " AND s.community = ?"
        rows = await self.fetch(
            f"SELECT g.id, g.story_id, g.prompt, g.output{columns} FROM generations g"
            " JOIN stories s ON s.id = g.story_id"
            f" WHERE g.output != '' AND g.finish_reason != 'cancelled' AND {TRAINABLE_STORY}"
            + where,
            (community,) if community is not None else (),
        )
        return {r["id"]: dict(r) for r in rows}

    async def excluded_lines(self) -> dict[int, list[str]]:
        """Per story, the lines of users who asked to be forgotten: a prompt holding one
        is never trained on."""
        excluded: dict[int, list[str]] = {}
        for r in await self.fetch("SELECT story_id, text FROM turns WHERE train_excluded = 1"):
            excluded.setdefault(r[0], []).append(r[1])
        return excluded

    async def pair_weights(self) -> dict[tuple[int, int], float]:
        """Each stored preference pair's weight (the highest, where several people made it)."""
        rows = await self.fetch(
            "SELECT chosen_generation_id, rejected_generation_id, MAX(weight)"
            " FROM preference_pairs GROUP BY chosen_generation_id, rejected_generation_id"
        )
        return {(r[0], r[1]): float(r[2]) for r in rows}

    async def retried_generations(self) -> list[tuple[int, int]]:
        """(replaced, replacement) for every storyteller turn that a retry replaced."""
        rows = await self.fetch(
            "SELECT old.generation_id, new.generation_id FROM turns old JOIN turns new"
            " ON new.story_id = old.story_id AND new.position = old.position AND new.id > old.id"
            " WHERE old.kind = 'bot' AND new.kind = 'bot' AND old.status = 'replaced'"
            " AND old.generation_id IS NOT NULL AND new.generation_id IS NOT NULL"
        )
        return [(r[0], r[1]) for r in rows]

    async def counted_votes(self) -> list[tuple[int, str, float]]:
        """(generation, user, value) of every vote that counts (not neutral, not by
        someone forgotten)."""
        rows = await self.fetch(
            "SELECT f.generation_id, f.user_id, f.value FROM votes f"
            " WHERE f.value != 0 AND f.user_id NOT IN (SELECT user_id FROM forgotten_users)"
        )
        return [(r[0], r[1], r[2]) for r in rows]

    async def round_bounds(self) -> list[int]:
        """The newest generation each training round's data reached, in order."""
        rows = await self.fetch(
            "SELECT DISTINCT data_until FROM training_runs WHERE data_until IS NOT NULL"
        )
        return sorted(r[0] for r in rows)

    async def votes_per_day(
        self, since: str, community: str | None
    ) -> dict[str, tuple[int, int, int]]:
        """Per day (YYYY-MM-DD) from `since`: votes that like, dislike, and count as
        neither (a user's emoji once per continuation)."""
        where, params = "WHERE f.created_at >= ?", [since]
        if community:
            where += " AND s.community = ?"
            params.append(community)
        rows = await self.fetch(
            f"SELECT substr(f.created_at, 1, 10) AS day, COALESCE({_LIKED}, 0),"
            f" COALESCE({_DISLIKED}, 0), COALESCE({_NEUTRAL}, 0)"
            " FROM votes f JOIN generations g ON g.id = f.generation_id"
            f" JOIN stories s ON s.id = g.story_id {where} GROUP BY day",
            params,
        )
        return {r[0]: (int(r[1]), int(r[2]), int(r[3])) for r in rows}
