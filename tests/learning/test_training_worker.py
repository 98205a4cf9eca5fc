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
