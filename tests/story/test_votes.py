"""Votes belong to the message they were cast on; bursts of reactions are written in
batches, in order, without starving commands."""

from __future__ import annotations

import asyncio
import random
import sqlite3
import time

from storyengine.records import Author
from storyengine.storage.store import Store, load_migrations

ANN = Author("1", "Ann")


async def test_split_reply_parts_keep_their_votes_apart(tiny_engine):
    engine = tiny_engine
    result = await engine.start_story("c", "Once upon a time.", author=ANN)
    for part in ("part-1", "part-2"):  # a reply over 2,000 characters, in two messages
        await engine.link_message(part, result.generation_id)
    assert await engine.record_reaction("part-1", "7", "👍", added=True)
    assert await engine.record_reaction("part-2", "7", "👍", added=True)
    # Counted once for the generation, however many parts carry it.
    assert await engine.store.feedback(result.generation_id) == [("7", "👍", 1.0)]
    assert await engine.record_reaction("part-2", "7", "👍", added=False)
    assert await engine.store.feedback(result.generation_id) == [("7", "👍", 1.0)]  # part 1's
    assert await engine.record_reaction("part-1", "7", "👍", added=False)
    assert await engine.store.feedback(result.generation_id) == []
    stats = await engine.feedback_stats()
    assert sum(r["liked"] for r in stats) == 0


async def test_migration_gives_old_votes_their_first_message(tmp_path):
    path = tmp_path / "old.db"
    store = await Store(path).open(migrate=False)
    for migration in load_migrations():
        if migration.version >= 5:
            break
        await store.db.executescript(
            migration.sql
            + f";INSERT INTO schema_migrations (version, name) VALUES ({migration.version},"
            f" '{migration.name}');"
        )
    story = await store.create_story("c", "P", genre=None, mode="solo", created_by="u")
    cursor = await store.db.execute(  # as release 0004 wrote generations
        "INSERT INTO generations (story_id, channel, prompt, output, raw_output, params,"
        " model_id, prompt_tokens, output_tokens, finish_reason, latency_s)"
        " VALUES (?, 'c', 'P', 'Text.', 'Text.', '{}', 'm', 1, 1, 'eos', 0.1)",
        (story.id,),
    )
    generation = cursor.lastrowid
    await store.db.execute("INSERT INTO story_messages VALUES ('m2', ?, 'now')", (generation,))
    await store.db.execute("INSERT INTO story_messages VALUES ('m1', ?, 'now')", (generation,))
    await store.db.execute(
        "INSERT INTO feedback (generation_id, user_id, emoji, value) VALUES (?, 'u', '👍', 1)",
        (generation,),
    )
    await store.db.execute("INSERT INTO forgotten_users (user_id) VALUES ('gone')")
    await store.migrate()
    rows = await store.db.execute_fetchall("SELECT message_id, user_id FROM feedback")
    assert [tuple(r) for r in rows] == [("m1", "u")]
    alias = await store.forgotten_alias("gone")
    assert alias and alias.startswith("forgotten:")
    await store.close()


async def test_a_burst_of_reactions_is_exact_and_does_not_starve_commands(tiny_engine):
    """5,000 raw reaction events from 50 people (duplicates, removals, unknown messages,
    a forgotten user) while a command reads the database: every row exact, the command
    answered fast, and the events written in a few transactions, not 5,000."""
    engine = tiny_engine
    result = await engine.start_story("c", "Once upon a time.", author=ANN)
    messages = [f"msg-{i}" for i in range(20)]
    for message in messages:
        await engine.link_message(message, result.generation_id)
    await engine.forget_user("user-49")
    rng = random.Random(0)
    events = []
    for _ in range(5000):
        message = rng.choice([*messages, "not-a-story-message"])
        user = f"user-{rng.randrange(50)}"
        emoji = rng.choice(["👍", "👎", "❤️", "🎉"])
        events.append((message, user, emoji, rng.random() < 0.7))
    expected: set[tuple[str, str, str]] = set()  # an independent model of the end state
    for message, user, emoji, added in events:
        if message == "not-a-story-message" or user == "user-49":
            continue
        (expected.add if added else expected.discard)((message, user, emoji))

    batches_before = engine.reactions.batches
    burst = [
        asyncio.ensure_future(engine.record_reaction(m, u, e, added=a)) for m, u, e, a in events
    ]
    await asyncio.sleep(0)  # the burst is queued; now a command arrives
    started = time.monotonic()
    await engine.set_authors_note("c", "The mood turns spooky.")
    answered = time.monotonic() - started
    counted = await asyncio.gather(*burst)

    rows = await engine.store.db.execute_fetchall("SELECT message_id, user_id, emoji FROM feedback")
    assert sorted(tuple(r) for r in rows) == sorted(expected)  # 0 lost, 0 doubled
    assert counted.count(False) == sum(
        1 for m, u, _, _ in events if m == "not-a-story-message" or u == "user-49"
    )
    assert engine.reactions.batches - batches_before <= 20
    assert answered < 3.0, answered


def test_a_database_from_a_newer_release_is_refused(tmp_path):
    import pytest

    from storyengine.errors import ConfigError

    path = tmp_path / "newer.db"

    async def open_it() -> None:
        store = await Store(path).open()
        await store.close()

    asyncio.run(open_it())
    with sqlite3.connect(path) as db:
        db.execute("INSERT INTO schema_migrations (version, name) VALUES (9999, 'from_the_future')")
    with pytest.raises(ConfigError, match="9999"):
        asyncio.run(open_it())
