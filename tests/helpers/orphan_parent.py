"""A bot stand-in for the tests that kill a bot: it starts a child, prints the child's
pid, then waits to be killed.

    python tests/orphan_parent.py scheduler DB ADAPTER_DIR COMMAND...
        start COMMAND as a training round, as the bot does (TrainingScheduler.start)
    python tests/orphan_parent.py plain LOG COMMAND...
        start COMMAND with TALEWEAVER_PARENT_PID set and nothing else (no parent-death
        signal), its output to the file LOG
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from pathlib import Path

from storyengine.config import Settings
from storyengine.learning.scheduling import TrainingSchedule, TrainingScheduler
from storyengine.storage.store import Store


async def scheduler(db: str, adapters: str, command: list[str]) -> None:
    store = await Store(db).open()
    settings = Settings(db_path=Path(db), adapter_dir=Path(adapters))
    training = TrainingScheduler(settings, store, TrainingSchedule(), command=command)
    job = await training.start("test")
    assert job.process is not None, job.last_line
    print(job.process.pid, flush=True)
    await asyncio.Event().wait()


def plain(log: str, command: list[str]) -> None:
    env = {**os.environ, "TALEWEAVER_PARENT_PID": str(os.getpid())}
    with open(log, "wb") as out:
        child = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
    print(child.pid, flush=True)
    child.wait()


if __name__ == "__main__":
    if sys.argv[1] == "scheduler":
        asyncio.run(scheduler(sys.argv[2], sys.argv[3], sys.argv[4:]))
    else:
        plain(sys.argv[2], sys.argv[3:])
