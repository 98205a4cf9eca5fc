"""The bot as its own process, as a supervisor sees it: SIGTERM at several moments ends
it within 10 seconds with nothing lost and the interrupted message saying so; start-up
errors are one line and an exit code, never a traceback."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import sys
import time
import uuid
from pathlib import Path
from typing import ClassVar

import pytest

from tests.helpers.fake_discord import OTHER_CHANNEL, TEXT_CHANNEL, TOKEN, FakeDiscord, FakeUser

pytestmark = pytest.mark.slow

ANN = FakeUser(101, "Ann")
ADMIN = FakeUser(105, "Ada", admin=True)
HERE = Path(__file__).parents[1] / "helpers"


class BotProcess:
    started: ClassVar[list[asyncio.subprocess.Process]] = []

    def __init__(self, fake: FakeDiscord, tmp_path: Path, **env: str) -> None:
        self.fake, self.tmp_path = fake, tmp_path
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("STORY_", "BOT_"))},
            "FAKE_DISCORD": f"http://127.0.0.1:{fake.port}",
            "DISCORD_TOKEN": TOKEN,
            "STORY_DB_PATH": str(tmp_path / "bot.db"),
            "STORY_ADAPTER_DIR": str(tmp_path / "adapters"),
            "STORY_DEVICE": "cpu",
            "STORY_LOG_LEVEL": "INFO",
            "BOT_COOLDOWN": "0",
            "BOT_EDIT_INTERVAL": "0.2",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        self.process: asyncio.subprocess.Process | None = None
        self.log = b""

    async def start(self, *, wait_ready: bool = True) -> None:
        self.fake.ready.clear()
        self.fake.connected.clear()
        self.process = await asyncio.create_subprocess_exec(
            sys.executable,
            str(HERE / "bot_process.py"),
            env=self.env,
            cwd=self.tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
        )
        BotProcess.started.append(self.process)
        if wait_ready:
            await asyncio.wait_for(self.fake.ready.wait(), 120)
            await asyncio.wait_for(self.fake.connected.wait(), 60)

    async def terminate(self) -> tuple[int, float]:
        """SIGTERM; returns the exit code and how long the process took to end."""
        assert self.process is not None
        started = time.monotonic()
        self.process.send_signal(signal.SIGTERM)
        out, _ = await asyncio.wait_for(self.process.communicate(), 30)
        self.log = out
        return self.process.returncode or 0, time.monotonic() - started


@pytest.fixture
async def fake():
    fake = FakeDiscord()
    await fake.start()
    yield fake
    for process in BotProcess.started:  # a failed test must not leave a bot running
        if process.returncode is None:
            process.kill()
            await process.wait()
    BotProcess.started.clear()
    await fake.stop()
    assert fake.unexpected == []


def database_state(path: Path) -> dict:
    with sqlite3.connect(path) as db:
        return {
            "integrity": db.execute("PRAGMA integrity_check").fetchone()[0],
            "finish": [r[0] for r in db.execute("SELECT finish_reason FROM generations")],
            "stories": [r[0] for r in db.execute("SELECT status FROM stories")],
        }


def wal_size(path: Path) -> int:
    wal = path.with_name(path.name + "-wal")
    return wal.stat().st_size if wal.exists() else 0


async def test_sigterm_while_writing_stops_cleanly_and_says_so(fake, tmp_path):
    bot = BotProcess(fake, tmp_path, STORY_MAX_NEW_TOKENS="400", FAKE_MIN_NEW_TOKENS="400")
    await bot.start()
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox ran.")
    # Partway: the reply has grown at least once.
    await fake.wait_for(
        lambda: start.original_id and fake.messages[start.original_id]["content"].endswith(" …"),
        120,
    )
    code, seconds = await bot.terminate()
    assert code == 0 and seconds < 10, (code, seconds, bot.log[-2000:])
    message = fake.messages[start.original_id]["content"]
    assert "the bot is shutting down" in message
    assert message.startswith("📖 **Once upon a time, a fox ran.**")  # what was written stays
    state = database_state(tmp_path / "bot.db")
    assert state == {"integrity": "ok", "finish": ["cancelled"], "stories": ["active"]}
    assert wal_size(tmp_path / "bot.db") == 0  # checkpointed on close
    assert b"Traceback" not in bot.log and b"Event loop is closed" not in bot.log, bot.log

    # After a restart the story goes on.
    bot = BotProcess(fake, tmp_path)
    await bot.start()
    cont = await fake.slash(ANN, TEXT_CHANNEL, "continue", text="The fox stopped.")
    await fake.wait_for(lambda: cont.original_id and fake.reactions_on(cont.original_id), 120)
    code, seconds = await bot.terminate()
    assert code == 0 and seconds < 10


async def test_sigterm_with_a_generation_waiting_in_the_queue(fake, tmp_path):
    bot = BotProcess(
        fake,
        tmp_path,
        STORY_MAX_NEW_TOKENS="400",
        FAKE_MIN_NEW_TOKENS="400",
        STORY_MAX_BATCH_SIZE="1",
    )
    await bot.start()
    first = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox ran.")
    await fake.wait_for(lambda: first.original_id, 60)
    second = await fake.slash(ANN, OTHER_CHANNEL, "start", premise="Once upon a time, an owl.")
    await fake.wait_for(lambda: second.acked_at, 60)
    await fake.wait_for(
        lambda: first.original_id and fake.messages[first.original_id]["content"].endswith(" …"),
        120,
    )
    code, seconds = await bot.terminate()
    assert code == 0 and seconds < 10, (code, seconds, bot.log[-2000:])
    for record in (first, second):
        assert "the bot is shutting down" in fake.messages[record.original_id]["content"]
    state = database_state(tmp_path / "bot.db")
    assert state["integrity"] == "ok" and state["finish"] == ["cancelled", "cancelled"]


async def test_sigterm_during_a_training_round_stops_the_round_too(fake, tmp_path):
    marker = f"fake-round-{uuid.uuid4().hex}"
    bot = BotProcess(fake, tmp_path, FAKE_TRAINING_SECONDS="600", FAKE_TRAINING_MARKER=marker)
    await bot.start()
    train = await fake.slash(ADMIN, TEXT_CHANNEL, "train", group="storyadmin")
    await fake.wait_for(lambda: train.acked_at, 60)
    await wait_until(lambda: processes_with(marker), 30)
    code, seconds = await bot.terminate()
    assert code == 0 and seconds < 10, (code, seconds, bot.log[-2000:])
    await wait_until(lambda: not processes_with(marker), 5)


async def test_sigterm_while_starting_and_while_idle(fake, tmp_path):
    bot = BotProcess(fake, tmp_path)
    await bot.start(wait_ready=False)
    await asyncio.sleep(1.0)  # importing, or loading the model: somewhere in start-up
    code, seconds = await bot.terminate()
    # On a loaded machine the signal can come while Python is still importing, before
    # the bot's handler exists: then it ends by SIGTERM's default action, having opened
    # and written nothing, which is as clean.
    before_handler = code == -signal.SIGTERM and not bot.log
    assert seconds < 10 and (code in (0, 130) or before_handler), (code, bot.log[-2000:])
    assert b"Traceback" not in bot.log, bot.log

    bot = BotProcess(fake, tmp_path)
    await bot.start()
    code, seconds = await bot.terminate()
    assert code == 0 and seconds < 10 and b"Traceback" not in bot.log, bot.log


async def test_discord_out_of_reach_is_one_line_and_exit_code_1(tmp_path):
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith(("STORY_", "BOT_"))},
        "FAKE_DISCORD": "http://127.0.0.1:9",  # nothing listens there
        "DISCORD_TOKEN": TOKEN,
        "STORY_DB_PATH": str(tmp_path / "bot.db"),
        "STORY_LOG_LEVEL": "WARNING",  # without the start-up lines (INFO)
    }
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(HERE / "bot_process.py"),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(process.communicate(), 60)
    lines = err.decode().strip().splitlines()
    assert process.returncode == 1
    assert len(lines) == 1 and lines[0].startswith("taleweaver-bot: error: cannot reach Discord")
    assert TOKEN not in err.decode() + out.decode()


async def wait_until(condition, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {condition}")
        await asyncio.sleep(0.1)


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found
