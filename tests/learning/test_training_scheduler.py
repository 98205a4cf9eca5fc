"""When a training round starts, and the round as a child process."""

import asyncio
import os
import signal
import sys
import time
from pathlib import Path

import psutil
import pytest

from storyengine.config import Settings
from storyengine.errors import TrainingBusy
from storyengine.learning.registry import round_lock
from storyengine.learning.rounds import RoundConfig, run_round
from storyengine.learning.scheduling import (
    TrainingSchedule,
    TrainingScheduler,
    child_environment,
    parse_db_time,
)
from storyengine.storage.store import Store
from tests.helpers.models import record_text


@pytest.fixture
async def store(tmp_path):
    store = await Store(tmp_path / "s.db").open()
    yield store
    await store.close()


@pytest.fixture
def settings(tmp_path):
    return Settings(db_path=tmp_path / "s.db", adapter_dir=tmp_path / "adapters", device="cpu")


async def add_votes(store: Store, n: int, community: str | None = None) -> None:
    story = await store.create_story(
        f"c{community}", "P.", genre=None, mode="solo", created_by="u", community=community
    )
    for i in range(n):
        g = await record_text(store, story.id, "Prompt", f"Text {i}.")
        await store.set_feedback(g, f"user{i}", "👍", 1.0)


def python(code: str) -> list[str]:
    return [sys.executable, "-c", code]


async def test_a_round_is_due_after_enough_feedback_and_time(store, settings):
    now = [parse_db_time("2026-01-01T00:00:00.000Z")]
    scheduler = TrainingScheduler(
        settings,
        store,
        TrainingSchedule(min_new_feedback=3, interval_s=3600),
        clock=lambda: now[0],
    )
    assert await scheduler.due() is None
    await add_votes(store, 3, community="guild")  # learning is off there: not counted
    assert await scheduler.due() is None
    await store.set_learning("guild", True, "admin")
    assert await scheduler.due() == "3 new reactions and choices"

    # A round started at 'now': nothing is due until the interval has passed, and
    # only feedback that came after it counts.
    await store._write(
        "INSERT INTO training_runs (method, status, started_at) VALUES ('dpo', 'done', ?)",
        ("2026-01-01T00:00:00.000Z",),
    )
    assert await scheduler.new_feedback() == 3  # those votes are newer than 2026-01-01
    now[0] += 1800
    assert await scheduler.due() is None
    now[0] += 1801
    assert await scheduler.due() == "3 new reactions and choices"

    off = TrainingScheduler(settings, store, TrainingSchedule(min_new_feedback=1, interval_s=None))
    assert await off.due() is None


async def test_the_child_runs_once_at_a_time_and_its_last_line_is_the_outcome(store, settings):
    scheduler = TrainingScheduler(
        settings,
        store,
        TrainingSchedule(),
        command=python(
            "import sys, time, warnings\n"
            "print('training dpo on 20 examples', flush=True)\n"
            "warnings.warn('noise')\n"
            "time.sleep(0.5)\n"
            "print('promoted v0001')\n"
        ),
    )
    job = await scheduler.start("admin asked")
    assert scheduler.running and job.running
    with pytest.raises(TrainingBusy):
        await scheduler.start("again")
    await scheduler.wait()
    assert not scheduler.running
    assert job.returncode == 0 and job.outcome == "promoted v0001"
    logged = job.log_path.read_text()
    assert "training dpo on 20 examples" in logged and "UserWarning: noise" in logged
    assert job.log_path.parent == settings.adapter_dir / "logs"


async def test_a_database_password_never_reaches_the_rounds_command_line(store, settings):
    """`ps` shows every process's arguments to every user: the URL (with its password)
    reaches the round through its environment."""
    url = "postgresql://bot:s3cret@db/taleweaver"
    shared = settings.replace(db_url=url)
    scheduler = TrainingScheduler(shared, store, TrainingSchedule())
    assert not any("s3cret" in part for part in scheduler.default_command())
    assert "--db" in TrainingScheduler(settings, store, TrainingSchedule()).default_command()
    told = TrainingScheduler(
        shared,
        store,
        TrainingSchedule(),
        command=python(f"import os; print(os.environ['STORY_DB_URL'] == {url!r})"),
    )
    job = await told.start("asked")
    await told.wait()
    assert job.returncode == 0 and job.outcome == "True"


async def test_a_failing_child_is_reported_and_closing_stops_a_running_one(store, settings):
    failing = TrainingScheduler(
        settings, store, TrainingSchedule(), command=python("raise SystemExit('no disk left')")
    )
    job = await failing.start("test")
    await failing.wait()
    assert job.outcome == "failed (exit code 1): no disk left"

    slow = TrainingScheduler(
        settings, store, TrainingSchedule(), command=python("import time; time.sleep(60)")
    )
    job = await slow.start("test")
    await asyncio.wait_for(slow.close(grace_s=5), 10)
    assert not job.running and job.returncode != 0


def test_secrets_do_not_reach_the_trainer():
    env = child_environment(
        {"DISCORD_TOKEN": "x", "HF_TOKEN": "y", "MY_API_KEY": "z", "STORY_DB_PATH": "a.db"}
    )
    assert env == {"DISCORD_TOKEN": "", "HF_TOKEN": "", "MY_API_KEY": "", "STORY_DB_PATH": "a.db"}


async def test_the_child_does_not_read_the_token_back_from_dotenv(
    store, settings, tmp_path, monkeypatch
):
    """The bot loaded `.env` into its environment; the child, started in the same
    directory, loads `.env` as well, and must still not see the token."""
    (tmp_path / ".env").write_text("DISCORD_TOKEN=secret-from-dotenv\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("DISCORD_TOKEN", "secret-from-dotenv")
    scheduler = TrainingScheduler(
        settings,
        store,
        TrainingSchedule(),
        command=python(
            "import os; from dotenv import load_dotenv; load_dotenv(override=False);"
            " print('token=' + repr(os.environ.get('DISCORD_TOKEN')))"
        ),
    )
    job = await scheduler.start("test")
    await scheduler.wait()
    assert job.outcome == "token=''"


async def test_the_real_round_runs_as_a_child_and_skips_without_feedback(store, settings):
    scheduler = TrainingScheduler(settings, store, TrainingSchedule())
    job = await scheduler.start("test")
    await asyncio.wait_for(scheduler.wait(), 120)
    assert job.returncode == 0, job.log_path.read_text()
    assert job.outcome.startswith("skipped: not enough feedback yet")
    runs = await store.db.execute_fetchall("SELECT status FROM training_runs")
    assert [r[0] for r in runs] == ["done"]


async def test_only_one_round_holds_the_adapter_directory(settings):
    with round_lock(settings.adapter_dir):
        with pytest.raises(TrainingBusy):
            await run_round(settings, RoundConfig(), say=lambda line: None)
    with round_lock(settings.adapter_dir):  # released: can be taken again
        pass


def gone(pid: int) -> bool:
    """The process has ended (a zombie nobody has reaped yet counts as ended)."""
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def wait_until(condition, timeout_s: float, failure: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"{failure} within {timeout_s} s")
        await asyncio.sleep(0.05)


async def start_parent(*args: str) -> tuple[asyncio.subprocess.Process, int]:
    """orphan_parent.py with `args`: the parent, and the pid of the child it started."""
    parent = await asyncio.create_subprocess_exec(
        sys.executable,
        str(Path(__file__).parents[1] / "helpers" / "orphan_parent.py"),
        *args,
        stdout=asyncio.subprocess.PIPE,
    )
    line = await asyncio.wait_for(parent.stdout.readline(), 60)
    assert line, "the parent did not start its child"
    return parent, int(line)


def end(pid: int) -> None:
    """Kill a process a failed test left behind (one this test started)."""
    if not gone(pid):
        os.kill(pid, signal.SIGKILL)


@pytest.mark.skipif(sys.platform != "linux", reason="the parent-death signal is Linux's")
async def test_a_round_ends_when_the_bot_is_killed_outright(settings):
    """kill -9 of the bot: its round must not live on (it could still promote an
    adapter, and it holds the round lock against the restarted bot). The child here
    is not storyengine, so it has no watchdog of its own: the kernel's signal ends it."""
    parent, child = await start_parent(
        "scheduler",
        str(settings.database),
        str(settings.adapter_dir),
        *python("import time; time.sleep(120)"),
    )
    try:
        assert not gone(child)
        parent.kill()
        await parent.wait()
        await wait_until(lambda: gone(child), 5, "the round did not end with the bot")
    finally:
        end(child)


async def test_the_watchdog_ends_a_round_whose_parent_is_gone(tmp_path):
    """The portable fallback: a child started with TALEWEAVER_PARENT_PID, and no parent-death
    signal, ends itself when that parent is gone, saying why."""
    log = tmp_path / "child.log"
    parent, child = await start_parent(
        "plain",
        str(log),
        *python(
            "import time\n"
            "from storyengine.learning.scheduling import watch_parent\n"
            "watch_parent(interval_s=0.1)\n"
            "print('watching', flush=True)\n"
            "time.sleep(120)\n"
        ),
    )
    try:
        await wait_until(lambda: "watching" in log.read_text(), 60, "the child did not start")
        parent.kill()
        await parent.wait()
        await wait_until(lambda: gone(child), 5, "the watchdog did not end the child")
        said = f"the process that started this round (pid {parent.pid}) is gone; stopping"
        assert said in log.read_text()
    finally:
        end(child)


@pytest.mark.parametrize("command", [["round"], ["sft", "--corpus", "corpus.txt"]])
async def test_train_commands_watch_the_process_that_started_them(tmp_path, command):
    """`train round` and `train sft` end at once when TALEWEAVER_PARENT_PID is not their
    parent (it is gone): they start the watchdog before anything else."""
    from storyengine.learning.scheduling import PARENT_GONE_EXIT

    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    env["TALEWEAVER_PARENT_PID"] = str(os.getppid())  # alive, but not the child's parent
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "storyengine", "train", *command],
        *["--db", str(tmp_path / "s.db"), "--dir", str(tmp_path / "adapters")],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    out, err = await process.communicate()
    assert process.returncode == PARENT_GONE_EXIT, (out, err)
    assert f"(pid {os.getppid()}) is gone; stopping the round" in err.decode()
    assert not (tmp_path / "s.db").exists()  # it stopped before touching anything


async def test_closing_ends_even_a_round_that_ignores_sigterm_within_seconds(store, settings):
    """The bot's shutdown must be done within 10 s: SIGTERM, then SIGKILL after 3 s."""
    stubborn = TrainingScheduler(
        settings,
        store,
        TrainingSchedule(),
        command=python(
            "import signal, time\n"
            "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
            "print('ready', flush=True)\n"
            "time.sleep(60)\n"
        ),
    )
    job = await stubborn.start("test")
    await wait_until(lambda: job.last_line == "ready", 60, "the child did not start")
    await asyncio.wait_for(stubborn.close(), 6)
    assert not job.running and job.returncode == -signal.SIGKILL
