"""Training on another machine: TRAIN_MODE=external records a round due in the
database; `storyengine train worker` takes it and runs it."""

import asyncio
import subprocess
import sys

import pytest

from storyengine.errors import TrainingBusy
from storyengine.learning.scheduling import TrainingSchedule, TrainingScheduler
from storyengine.storage.store import Store
from tests.helpers.postgres import fresh_database


async def test_an_external_round_is_recorded_for_a_worker_and_starts_nothing(settings):
    store = await Store(settings.database).open()
    try:
        schedule = TrainingSchedule(min_new_feedback=1, interval_s=60, mode="external")
        # A command that cannot run: nothing may be started here.
        scheduler = TrainingScheduler(settings, store, schedule, command=["/nonexistent"])
        job = await scheduler.start("asked by an admin", community="42")
        assert not job.running and job.kind == "queued" and job.process is None
        assert job.outcome == "queued: round request #1, for a training worker"
        again = await scheduler.start("asked again", community="42")  # one waits already
        assert again.outcome == job.outcome
        shared = await scheduler.start("asked for the shared one")
        assert "#2" in shared.outcome
        requests = await store.round_requests()
        assert [(r["id"], r["community"], r["taken_at"]) for r in requests] == [
            (2, None, None),
            (1, "42", None),
        ]
        assert scheduler.outcomes == {"queued": 3}
    finally:
        await store.close()


async def worker_once(database, adapter_dir) -> subprocess.CompletedProcess[str]:
    command = [
        *(sys.executable, "-m", "storyengine", "train", "worker", "--once"),
        *("--db", str(database), "--dir", str(adapter_dir)),
    ]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=300
    )


@pytest.mark.parametrize("store", ["sqlite", "postgresql"])
async def test_a_worker_takes_the_request_runs_its_round_and_notes_the_end(store, tmp_path):
    async def run(database) -> None:
        db = await Store(database).open()
        try:
            await db.request_round("5 new reactions and choices", None)
        finally:
            await db.close()
        done = await worker_once(database, tmp_path / "adapters")
        assert done.returncode == 0, done.stderr
        assert "round request #1 (5 new reactions and choices)" in done.stdout
        db = await Store(database).open()
        try:
            (request,) = await db.round_requests()
            assert request["taken_by"] and request["finished_at"]
            assert request["outcome"].startswith("skipped: ")  # no feedback to learn from
        finally:
            await db.close()
        idle = await worker_once(database, tmp_path / "adapters")
        assert idle.returncode == 0 and idle.stdout.strip() == "no round requested"

    if store == "sqlite":
        await run(tmp_path / "stories.db")
    else:
        async with fresh_database() as url:
            await run(url)


async def test_one_round_at_a_time_across_machines_sharing_a_postgresql_database():
    async with fresh_database() as url:
        here = await Store(url).open()
        there = await Store(url).open()  # another machine's process
        try:
            async with here.round_lock():
                with pytest.raises(TrainingBusy):
                    async with there.round_lock():
                        pass
            async with there.round_lock():  # released with the run
                pass
        finally:
            await here.close()
            await there.close()


async def test_a_request_whose_worker_died_is_taken_again_once_its_lease_runs_out(database):
    store = await Store(database).open()
    try:
        await store.request_round("due", None)
        assert await store.take_round_request("a", lease_s=600) is not None
        assert await store.take_round_request("b", lease_s=600) is None  # a still has it
        await asyncio.sleep(0.01)
        assert await store.renew_round_request(1, "a")  # a renews: its lease starts again
        await asyncio.sleep(0.01)
        # a went quiet for longer than the lease: b takes it, and a learns it lost it.
        assert await store.take_round_request("b", lease_s=0.005) == (1, None, "due")
        assert not await store.renew_round_request(1, "a")
        await store.finish_round_request(1, "skipped: nothing new")
        await asyncio.sleep(0.01)
        assert await store.take_round_request("c", lease_s=0.005) is None  # finished: never
    finally:
        await store.close()


async def test_a_killed_worker_leaves_its_request_to_the_next_worker(tmp_path):
    """SIGKILL in the middle of a round: the request is neither lost nor stuck; another
    worker takes it once its lease has run out, and notes how it ended."""
    database = tmp_path / "stories.db"
    db = await Store(database).open()
    try:
        await db.request_round("due", None)
    finally:
        await db.close()
    command = [
        *(sys.executable, "-m", "storyengine", "train", "worker", "--lease", "1"),
        *("--db", str(database), "--dir", str(tmp_path / "adapters")),
    ]
    doomed = await asyncio.create_subprocess_exec(*command, stdout=asyncio.subprocess.PIPE)
    assert doomed.stdout is not None
    line = await asyncio.wait_for(doomed.stdout.readline(), 120)
    assert line.startswith(b"round request #1 (due)")
    doomed.kill()
    await doomed.wait()
    await asyncio.sleep(1.5)  # past its lease
    done = await asyncio.to_thread(
        subprocess.run,
        [*command[:5], "--once", *command[5:]],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    assert "round request #1 (due)" in done.stdout
    db = await Store(database).open()
    try:
        (request,) = await db.round_requests()
        assert request["finished_at"] and request["outcome"].startswith("skipped: ")
    finally:
        await db.close()
