import sqlite3

import pytest

from storyengine.records import LoreCard
from storyengine.storage import database as store_module
from storyengine.storage.store import Migration, Store, load_migrations
from tests.helpers.postgres import table_columns


def test_migrations_are_numbered_and_shipped_in_the_package():
    migrations = load_migrations()
    assert migrations[0].version == 1 and migrations[0].name == "init"
    assert [m.version for m in migrations] == sorted(m.version for m in migrations)


async def test_migrations_apply_once_and_are_recorded(database):
    store = await Store(database).open(migrate=False)
    assert all(s.applied_at is None for s in await store.migration_status())
    applied = await store.migrate()
    assert [m.version for m in applied] == [m.version for m in load_migrations(store.dialect)]
    assert [m.version for m in applied] == [m.version for m in load_migrations()]  # alike
    assert await store.migrate() == []
    assert all(s.applied_at for s in await store.migration_status())
    tables = {table for table, _ in await table_columns(store)}
    await store.close()
    assert {"stories", "turns", "generations", "lore_cards", "schema_migrations"} <= tables


def test_both_dialects_have_the_same_migrations():
    """Numbered and named alike: a database of either kind is at the same schema
    version after the same release."""
    sqlite = [(m.version, m.name) for m in load_migrations()]
    assert sqlite == [(m.version, m.name) for m in load_migrations("postgresql")]


async def test_a_failing_migration_is_rolled_back(tmp_path, monkeypatch):
    good = load_migrations()
    bad = Migration(999, "broken", "CREATE TABLE half_done (x INTEGER);\nTHIS IS NOT SQL;")
    monkeypatch.setattr(store_module, "load_migrations", lambda dialect="sqlite": [*good, bad])
    store = await Store(tmp_path / "db.sqlite").open(migrate=False)
    with pytest.raises(sqlite3.OperationalError):
        await store.migrate()
    status = {s.version: s.applied_at for s in await store.migration_status()}
    assert status[999] is None and status[1] is not None
    rows = await store.db.execute_fetchall("SELECT name FROM sqlite_master WHERE name='half_done'")
    assert rows == []
    await store.close()


async def test_one_active_story_per_channel_is_enforced_by_the_schema(database):
    import asyncpg

    store = await Store(database).open()
    await store.create_story("c1", "A", genre=None, mode="solo", created_by="u")
    with pytest.raises((sqlite3.IntegrityError, asyncpg.UniqueViolationError)):
        await store.create_story("c1", "B", genre=None, mode="solo", created_by="u")
    await store.create_story("c2", "C", genre=None, mode="solo", created_by="u")
    await store.close()


async def test_turns_lore_and_settings_survive_reopening(database):
    path = database
    store = await Store(path).open()
    story = await store.create_story(
        "c", "Premise", genre="fable", mode="companion", created_by="u"
    )
    await store.add_turn(
        story.id, action=1, kind="user", text="Hello.", author_id="u", author_name="Ann"
    )
    first = await store.add_turn(story.id, action=1, kind="bot", text="Once.")
    await store.add_turn(
        story.id, action=1, kind="bot", text="Twice.", position=first.position, replacing=first.id
    )
    await store.upsert_lore(story.id, LoreCard("Owl", ("owl",), "Wise."))
    await store.set_channel_settings("c", "wild", {"temperature": 0.5})
    await store.close()

    store = await Store(path).open()
    story2 = await store.active_story("c")
    assert story2 == story
    turns = await store.active_turns(story.id)
    assert [t.text for t in turns] == ["Hello.", "Twice."]
    assert [t.status for t in await store.alternatives(story.id, first.position)] == [
        "replaced",
        "active",
    ]
    assert [c.name for c in await store.lore(story.id)] == ["Owl"]
    assert await store.channel_settings("c") == ("wild", {"temperature": 0.5})
    await store.close()


async def test_stories_from_before_the_opt_in_are_never_trained_on(tmp_path, monkeypatch):
    """Migration 0004: a Discord story (channel id of digits) told before learning
    became opt-in is kept out of training; the operator's own (CLI) stories are not."""
    import storyengine.storage.database as store_module
    from storyengine.learning.datasets import build_datasets

    every = load_migrations()
    monkeypatch.setattr(store_module, "load_migrations", lambda dialect="sqlite": every[:3])
    store = await Store(tmp_path / "old.db").open()
    for channel in ("123456789012345678", "terminal"):
        story = await store.db.execute(
            "INSERT INTO stories (channel, premise) VALUES (?, 'P.')", (channel,)
        )
        generation = await store.db.execute(
            "INSERT INTO generations (story_id, channel, prompt, output, raw_output, params,"
            " model_id, prompt_tokens, output_tokens, finish_reason, latency_s)"
            " VALUES (?, ?, 'Prompt', ?, '', '{}', 'm', 1, 1, 'eos', 0.1)",
            (story.lastrowid, channel, f"Told in {channel}."),
        )
        await store.db.execute(
            "INSERT INTO feedback (generation_id, user_id, emoji, value) VALUES (?, 'u', '👍', 1)",
            (generation.lastrowid,),
        )
    await store.db.commit()
    await store.close()

    monkeypatch.setattr(store_module, "load_migrations", lambda dialect="sqlite": every)
    store = await Store(tmp_path / "old.db").open()
    rows = await store.db.execute_fetchall("SELECT channel, community FROM stories ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("123456789012345678", "before-opt-in"),
        ("terminal", None),
    ]
    data = await build_datasets(store)
    assert [e.completion for e in data.examples] == ["Told in terminal."]
    await store.close()


async def test_a_failed_training_run_records_its_error_or_else_its_type(database):
    store = await Store(database).open()
    with_message = await store.start_training_run("dpo")
    without = await store.start_training_run("sft")
    await store.fail_training_run(with_message, RuntimeError("out of memory"))
    await store.fail_training_run(without, KeyboardInterrupt())
    rows = await store.db.execute_fetchall("SELECT status, error FROM training_runs ORDER BY id")
    assert [tuple(r) for r in rows] == [
        ("failed", "out of memory"),
        ("failed", "KeyboardInterrupt"),
    ]
    await store.close()
