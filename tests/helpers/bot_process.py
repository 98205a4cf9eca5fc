"""`taleweaver-bot` as its own process, pointed at a fake Discord: the real entry point
(`bot.__main__.main`: .env, settings, signals, shutdown), with only the addresses of
Discord's REST API and gateway replaced.

    FAKE_DISCORD=http://127.0.0.1:PORT python tests/bot_process.py

Test-only knobs (environment): FAKE_MIN_NEW_TOKENS makes every continuation that long
(so a test can stop one midway); FAKE_TRAINING_SECONDS replaces the training round's
child process by one that sleeps that long (a stand-in for a long round, to test that
the bot stops it), printing FAKE_TRAINING_MARKER so the test can find it.
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

from bot.__main__ import main  # noqa: E402 - after the addresses are replaced

raise SystemExit(main())
