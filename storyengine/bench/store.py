"""`storyengine bench store`: several bot processes writing to one database at once.

A bot may run as several processes on one database: the bot beside a training round or
the CLI, shards of one bot, or (with PostgreSQL) bots on several machines. Each process
opens a `Store` of its own, so its own connections, and a write stays whole only because
the database serialises the writers: SQLite's wait on the file's write lock
(`BEGIN IMMEDIATE`, with a busy timeout), PostgreSQL's on one advisory lock that every
write transaction takes first (`postgres.WRITE_LOCK`). This bench checks that nothing is
lost or doubled under that contention, and measures what the serialisation costs.

N writer processes (spawned; each opens its own `Store`) wait at a barrier, then each
writes M events as fast as it can, alternately a reaction on one shared message (from a
user id of its own for every event, so each vote must land as a row of its own) and a
turn appended to one shared round-robin story (at the story's next position, read and
written in one transaction: two writers that read the same "next" would share a
position). Then the rows are read back:

- votes on the message: each user id written once, none missing (lost), none twice
  (doubled);
- turns of the story: each turn written once, none missing, none twice, no position
  held by two turns (doubled too).

It prints events/s (every event over the writing phase's wall time, from the first
writer's first write to the last writer's last), each writer's p50/p95 latency per
write, and the lost and doubled counts; the command exits non-zero if any event was lost
or doubled, or a writer failed.

SQLite runs on a temporary file. With `--db-url postgresql://...`, the bench runs in the
database named, which must be one made for it and empty (a database with a Taleweaver
schema, a bot's, is refused, and so is the server's own `postgres`): it migrates it,
writes, and leaves the rows there; drop the database afterwards. So the bench needs no
CREATEDB right, and every SQL statement stays in `storage`.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import multiprocessing
import os
import queue
import statistics
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from ..config import redact_url
from ..errors import ConfigError
from ..storage.interfaces import ReactionEvent
from ..storage.store import Store
from .configs import StoreBenchConfig

MESSAGE = "bench-store-message"
EMOJI = "👍"
START_TIMEOUT_S = 120.0
"""How long the writers may take to start and connect (spawned: each imports anew)."""
MAINTENANCE_DATABASES = ("", "postgres", "template0", "template1")
"""Databases the bench never writes in, empty or not."""


@dataclass
class WriterResult:
    writer: int
    written: int = 0
    """Events whose call returned (the ones that must be found)."""
    started: float = 0.0
    ended: float = 0.0
    """Wall-clock time (`time.time()`, comparable across processes) of the first write's
    start and the last write's end."""
    latencies_s: list[float] = field(default_factory=list)
    error: str | None = None


def voter(writer: int, event: int) -> str:
    return f"w{writer}-e{event}"


def turn_text(writer: int, event: int) -> str:
    return f"writer {writer}, event {event}"


def is_reaction(event: int) -> bool:
    return event % 2 == 0


def write_events(
    location: str, writer: int, events: int, story_id: int, barrier: Any, results: Any
) -> None:
    """One writer process (the target of a spawned `Process`): its result goes to
    `results`, errors included."""
    result = WriterResult(writer)
    try:
        asyncio.run(_write_events(location, result, events, story_id, barrier))
    except BaseException:  # reported to the parent, which fails the run
        result.error = traceback.format_exc()
        barrier.abort()  # no one waits for a writer that will never come
    results.put(result)


async def _write_events(
    location: str, result: WriterResult, events: int, story_id: int, barrier: Any
) -> None:
    store = await Store(location).open(migrate=False)
    try:
        await asyncio.to_thread(barrier.wait, START_TIMEOUT_S)  # everyone at once
        result.started = time.time()
        w = result.writer
        for event in range(events):
            begun = time.perf_counter()
            if is_reaction(event):
                vote = ReactionEvent(MESSAGE, voter(w, event), EMOJI, True, 1.0)
                if await store.apply_reactions([vote]) != [True]:
                    raise RuntimeError(f"the reaction of {vote.user_id} did not count")
            else:
                await store.add_turn(
                    story_id,
                    action=w * events + event + 1,
                    kind="user",
                    text=turn_text(w, event),
                    author_id=f"writer-{w}",
                )
            result.latencies_s.append(time.perf_counter() - begun)
            result.written += 1
        result.ended = time.time()
    finally:
        await store.close()


async def bench_store(*, config: StoreBenchConfig, json_path: Path | None = None) -> dict[str, Any]:
    """Run the bench, print its table, and return (and with `json_path`, write) the
    figures."""
    async with bench_database(config.db_url) as location:
        store = await Store(location).open()
        try:
            generation_id, story_id = await _setup(store)
            writers = await _run_writers(str(location), story_id, config)
            results = await _check(store, generation_id, story_id, writers, config)
        finally:
            await store.close()
    results["setup"] = {
        "store": store.dialect,
        "db": redact_url(config.db_url) if config.db_url else "a temporary file",
        "writers": config.writers,
        "events_per_writer": config.events,
        "cpu_count": os.cpu_count(),
    }
    print_table(results)
    if json_path is not None:
        text = json.dumps(results, indent=2) + "\n"
        await asyncio.to_thread(json_path.write_text, text, encoding="utf-8")
    return results


@contextlib.asynccontextmanager
async def bench_database(db_url: str | None) -> AsyncIterator[Path | str]:
    """Where the bench writes: a temporary SQLite file, or the empty PostgreSQL database
    `db_url` names (one that holds a Taleweaver schema already is refused)."""
    if db_url is None:
        with tempfile.TemporaryDirectory(prefix="taleweaver-bench-store-") as folder:
            yield Path(folder) / "bench.db"
        return
    if urlsplit(db_url).path.strip("/") in MAINTENANCE_DATABASES:
        raise ConfigError(
            f"--db-url: {redact_url(db_url)}: name an empty database made for the bench "
            "(createdb taleweaver_bench; dropdb after), not the server's own"
        )
    store = await Store(db_url).open(migrate=False)
    try:
        if await store.schema_version():
            raise ConfigError(
                f"--db-url: {store.where} holds a Taleweaver database; the bench writes "
                "rows of its own, so give it an empty one (createdb, then dropdb after)"
            )
    finally:
        await store.close()
    yield db_url


async def _setup(store: Store) -> tuple[int, int]:
    """A story whose generation is shown as the shared message, and the round-robin
    story the turns go to: (the generation's id, the round-robin story's id)."""
    story = await store.create_story(
        "bench-votes", "A story to react to.", genre=None, mode="solo", created_by="bench"
    )
    generation_id = await store.record_generation(
        story_id=story.id,
        channel="bench-votes",
        prompt="Once upon a time",
        output=" there was a bench.",
        raw_output=" there was a bench.",
        params={},
        model_id="bench",
        adapter_id=None,
        prompt_tokens=4,
        output_tokens=5,
        finish_reason="eos",
        latency_s=0.0,
        ttft_s=0.0,
    )
    if not await store.link_message(MESSAGE, generation_id):
        raise RuntimeError("could not link the shared message")
    game = await store.create_story(
        "bench-turns",
        "A story everyone adds to.",
        genre=None,
        mode="round-robin",
        created_by="bench",
    )
    return generation_id, game.id


async def _run_writers(
    location: str, story_id: int, config: StoreBenchConfig
) -> list[WriterResult]:
    """Start the writer processes, release them together, and collect their results."""
    context = multiprocessing.get_context("spawn")
    barrier = context.Barrier(config.writers + 1)  # the writers and this process
    results = context.Queue()
    processes = [
        context.Process(
            target=write_events,
            args=(location, w, config.events, story_id, barrier, results),
            name=f"bench-store-writer-{w}",
            daemon=True,
        )
        for w in range(config.writers)
    ]
    for process in processes:
        process.start()
    try:
        with contextlib.suppress(threading.BrokenBarrierError):  # a writer's error says why
            await asyncio.to_thread(barrier.wait, START_TIMEOUT_S)
        return await asyncio.to_thread(_collect, results, processes)
    finally:
        for process in processes:
            await asyncio.to_thread(process.join, 10)
            if process.is_alive():
                process.terminate()


def _collect(results: Any, processes: list[Any]) -> list[WriterResult]:
    """Each writer's result, in writer order; a process that died without one (killed,
    crashed) gets an error of its own."""
    got: dict[int, WriterResult] = {}
    while len(got) < len(processes):
        try:
            result = results.get(timeout=1.0)
            got[result.writer] = result
        except queue.Empty:
            for w, process in enumerate(processes):
                if w not in got and process.exitcode not in (None, 0):
                    got[w] = WriterResult(w, error=f"exited with code {process.exitcode}")
    return [got[w] for w in range(len(processes))]


async def _check(
    store: Store,
    generation_id: int,
    story_id: int,
    writers: list[WriterResult],
    config: StoreBenchConfig,
) -> dict[str, Any]:
    """Read the rows back and count what was lost and doubled, with the timings."""
    wrote_votes = {voter(r.writer, e) for r in writers for e in range(r.written) if is_reaction(e)}
    wrote_turns = {
        turn_text(r.writer, e) for r in writers for e in range(r.written) if not is_reaction(e)
    }
    votes = Counter(user for user, _, _ in await store.feedback(generation_id))
    turns = await store.active_turns(story_id)
    texts = Counter(t.text for t in turns)
    positions = Counter(t.position for t in turns)
    finished = [r for r in writers if r.error is None and r.latencies_s]
    wall = max(r.ended for r in finished) - min(r.started for r in finished) if finished else 0.0
    events = sum(r.written for r in writers)
    return {
        "events": events,
        "wall_s": wall,
        "events_per_s": events / wall if wall > 0 else 0.0,
        "votes": {
            "expected": len(wrote_votes),
            "rows": sum(votes.values()),
            "lost": len(wrote_votes - votes.keys()),
            "doubled": sum(n - 1 for n in votes.values()),
        },
        "turns": {
            "expected": len(wrote_turns),
            "rows": len(turns),
            "lost": len(wrote_turns - texts.keys()),
            "doubled": sum(n - 1 for n in texts.values()),
            "shared_positions": sum(n - 1 for n in positions.values()),
        },
        "writers": [_writer_figures(r) for r in writers],
        "errors": [r.error for r in writers if r.error is not None],
        "planned_events": config.writers * config.events,
    }


def _writer_figures(result: WriterResult) -> dict[str, Any]:
    latencies = result.latencies_s or [0.0]
    span = result.ended - result.started
    return {
        "writer": result.writer,
        "written": result.written,
        "events_per_s": result.written / span if span > 0 else 0.0,
        "latency_p50_s": _percentile(latencies, 50),
        "latency_p95_s": _percentile(latencies, 95),
        "latency_max_s": max(latencies),
        "error": result.error is not None,
    }


def _percentile(values: list[float], q: int) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1]


def lost(results: dict[str, Any]) -> int:
    return results["votes"]["lost"] + results["turns"]["lost"]


def doubled(results: dict[str, Any]) -> int:
    turns = results["turns"]
    return results["votes"]["doubled"] + turns["doubled"] + turns["shared_positions"]


def failed(results: dict[str, Any]) -> bool:
    """Whether the run found an event lost or doubled, or a writer failed."""
    return bool(lost(results) or doubled(results) or results["errors"])


def print_table(results: dict[str, Any]) -> None:
    setup = results["setup"]
    print(
        f"store {setup['store']} ({setup['db']}): {setup['writers']} writer processes × "
        f"{setup['events_per_writer']} events (reactions and turns, alternately)"
    )
    print(f"{'writer':>6} {'events':>7} {'events/s':>9} {'p50 ms':>8} {'p95 ms':>8} {'max ms':>8}")
    for w in results["writers"]:
        print(
            f"{w['writer']:>6} {w['written']:>7} {w['events_per_s']:>9.1f} "
            f"{w['latency_p50_s'] * 1e3:>8.2f} {w['latency_p95_s'] * 1e3:>8.2f} "
            f"{w['latency_max_s'] * 1e3:>8.2f}" + ("  failed" if w["error"] else "")
        )
    votes, turns = results["votes"], results["turns"]
    print(
        f"{'all':>6} {results['events']:>7} {results['events_per_s']:>9.1f} "
        f"in {results['wall_s']:.2f} s"
    )
    print(
        f"votes {votes['rows']} of {votes['expected']} · turns {turns['rows']} of "
        f"{turns['expected']} ({turns['shared_positions']} positions shared) · "
        f"lost {lost(results)} · doubled {doubled(results)}"
    )
    for error in results["errors"]:
        print(f"a writer failed:\n{error}")
