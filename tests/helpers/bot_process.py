"""`taleweaver-bot` as its own process, pointed at a fake Discord: the real entry point
(`bot.__main__.main`: .env, settings, signals, shutdown), with only the addresses of
Discord's REST API and gateway replaced.

    FAKE_DISCORD=http://127.0.0.1:PORT python tests/bot_process.py

Test-only knobs (environment): FAKE_MIN_NEW_TOKENS makes every continuation that long
(so a test can stop one midway); FAKE_TRAINING_SECONDS replaces the training round's
child process by one that sleeps that long (a stand-in for a long round, to test that
the bot stops it), printing FAKE_TRAINING_MARKER so the test can find it;
FAKE_CLOCK_FILE names a file holding seconds the engine's clock (turn deadlines) runs
ahead of the real one, read at each tick, so a test can let a turn's time run out at
once in every process (as in-process tests move `engine.clock`).
"""

from __future__ import annotations

import os
import sys

import discord
import yarl
from discord.gateway import DiscordWebSocket

base = os.environ["FAKE_DISCORD"].rstrip("/")
discord.http.Route.BASE = base + "/api/v10"
DiscordWebSocket.DEFAULT_GATEWAY = yarl.URL(base.replace("http", "ws", 1) + "/gateway")

if os.environ.get("FAKE_MIN_NEW_TOKENS"):
    import storyengine.story.narrator

    storyengine.story.narrator.MIN_NEW_TOKENS = int(os.environ["FAKE_MIN_NEW_TOKENS"])

if os.environ.get("FAKE_TRAINING_SECONDS"):
    from storyengine.learning.scheduling import TrainingScheduler

    seconds, marker = os.environ["FAKE_TRAINING_SECONDS"], os.environ["FAKE_TRAINING_MARKER"]

    def long_round(self: TrainingScheduler) -> list[str]:
        code = f"import time; print({marker!r}, flush=True); time.sleep({seconds})"
        return [sys.executable, "-c", code, marker]

    TrainingScheduler.default_command = long_round  # type: ignore[method-assign]

if os.environ.get("FAKE_CLOCK_FILE"):
    import time
    from pathlib import Path

    from storyengine.story.stories import Stories

    ahead_file = Path(os.environ["FAKE_CLOCK_FILE"])

    def ahead_clock() -> float:
        try:
            ahead = float(ahead_file.read_text() or 0)
        except (OSError, ValueError):
            ahead = 0.0
        return time.time() + ahead

    plain_init = Stories.__init__

    def init_with_clock(self: Stories, *args: object, **kwargs: object) -> None:
        plain_init(self, *args, **kwargs)  # type: ignore[arg-type]
        self.clock = ahead_clock

    Stories.__init__ = init_with_clock  # type: ignore[method-assign]

from bot.__main__ import main  # noqa: E402 - after the addresses are replaced

raise SystemExit(main())
