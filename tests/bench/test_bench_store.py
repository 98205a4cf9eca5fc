"""`storyengine bench store`: writer processes on one database at once, run small on
SQLite and on PostgreSQL; every event must be found exactly once."""

import json
import os
import subprocess
import sys

import pytest

from storyengine.bench.store import (
    StoreBenchConfig,
    WriterResult,
    _check,
    _run_writers,
    _setup,
    bench_store,
    failed,
    turn_text,
    voter,
)
from storyengine.errors import ConfigError
from storyengine.storage.interfaces import ReactionEvent
from storyengine.storage.store import Store
from tests.helpers.postgres import fresh_database


def run_cli(*args: str, cwd):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    return subprocess.run(
        [sys.executable, "-m", "storyengine", "bench", "store", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=120,
    )


def assert_exact(results, *, writers: int, events: int) -> None:
    reactions, turns = (events + 1) // 2, events // 2
    assert results["events"] == writers * events and results["errors"] == []
    assert results["votes"] == {
        "expected": writers * reactions,
        "rows": writers * reactions,
        "lost": 0,
        "doubled": 0,
    }
    assert results["turns"] == {
        "expected": writers * turns,
        "rows": writers * turns,
        "lost": 0,
        "doubled": 0,
        "shared_positions": 0,
    }
    assert [w["written"] for w in results["writers"]] == [events] * writers
    assert results["events_per_s"] > 0 and not failed(results)


@pytest.mark.slow
def test_writers_on_sqlite_lose_and_double_nothing(tmp_path):
    out = tmp_path / "store.json"
    result = run_cli("--writers", "2", "--events", "20", "--json", str(out), cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "lost 0 · doubled 0" in result.stdout
    results = json.loads(out.read_text(encoding="utf-8"))
    assert results["setup"]["store"] == "sqlite"
    assert_exact(results, writers=2, events=20)


@pytest.mark.slow
async def test_writers_on_postgresql_lose_and_double_nothing():
    async with fresh_database() as url:
        config = StoreBenchConfig(writers=2, events=21, db_url=url)
        results = await bench_store(config=config)
        with pytest.raises(ConfigError, match="holds a Taleweaver database"):
            await bench_store(config=config)  # its rows are there now: refused
    assert results["setup"]["store"] == "postgresql"
    assert_exact(results, writers=2, events=21)


@pytest.mark.slow
async def test_a_writer_that_fails_fails_the_run(tmp_path):
    path = tmp_path / "bench.db"
    store = await Store(path).open()
    try:
        generation_id, _ = await _setup(store)
        # no such story: the first event (a reaction) lands, the second (a turn) fails
        writers = await _run_writers(str(path), 10**6, StoreBenchConfig(writers=1, events=4))
        results = await _check(store, generation_id, 10**6, writers, StoreBenchConfig())
    finally:
        await store.close()
    assert writers[0].written == 1 and "FOREIGN KEY" in (writers[0].error or "")
    assert results["votes"]["rows"] == 1 and results["votes"]["lost"] == 0
    assert failed(results)


async def test_the_check_counts_votes_and_turns_lost_or_doubled(tmp_path):
    store = await Store(tmp_path / "bench.db").open()
    try:
        generation_id, story_id = await _setup(store)
        writer = WriterResult(0, written=6, started=1.0, ended=2.0, latencies_s=[0.1] * 6)
        await store.apply_reactions(  # event 2's vote is missing
            [ReactionEvent("bench-store-message", voter(0, e), "👍", True, 1.0) for e in (0, 4)]
        )
        await store.add_turn(story_id, action=1, kind="user", text=turn_text(0, 1))
        await store.add_turn(story_id, action=2, kind="user", text=turn_text(0, 1))  # twice
        await store.add_turn(story_id, action=3, kind="user", text=turn_text(0, 5), position=1)
        results = await _check(store, generation_id, story_id, [writer], StoreBenchConfig())
    finally:
        await store.close()
    assert results["votes"] == {"expected": 3, "rows": 2, "lost": 1, "doubled": 0}
    assert results["turns"] == {
        "expected": 3,
        "rows": 3,
        "lost": 1,  # event 3's turn
        "doubled": 1,
        "shared_positions": 1,  # event 5's turn at position 1 too
    }
    assert results["events_per_s"] == 6.0 and failed(results)


@pytest.mark.parametrize("name", ["postgres", "template1", ""])
async def test_the_servers_own_database_is_never_written(name):
    url = f"postgresql://postgres@127.0.0.1:1/{name}"  # refused before connecting
    with pytest.raises(ConfigError, match="not the server's own"):
        await bench_store(config=StoreBenchConfig(writers=1, events=1, db_url=url))


def test_options_are_checked():
    with pytest.raises(ValueError, match="--writers"):
        StoreBenchConfig(writers=0)
    with pytest.raises(ValueError, match="--events"):
        StoreBenchConfig(events=100_001)
    with pytest.raises(ValueError, match="--db-url"):
        StoreBenchConfig(db_url="sqlite:///tmp/x.db")
    assert "s3cret" not in repr(StoreBenchConfig(db_url="postgresql://a:s3cret@h/db"))
