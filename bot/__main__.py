"""`taleweaver-bot` / `python -m bot`: run the Discord bot.

Reads DISCORD_TOKEN and the engine's STORY_* settings from the environment or `.env`.
A missing or malformed token, or a bad setting, ends it with one line and exit code 2.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import sys
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from storyengine.config import Settings

    from .settings import BotSettings

_TOKEN_SHAPE = re.compile(r"^[A-Za-z0-9_-]{20,}\.[A-Za-z0-9_-]{4,}\.[A-Za-z0-9_-]{20,}$")


def read_token(environ: dict[str, str] | os._Environ[str]) -> str:
    """The bot token, checked for shape. Raises `ValueError` with a message that never
    contains the token itself."""
    token = (environ.get("DISCORD_TOKEN") or "").strip()
    if not token:
        raise ValueError("DISCORD_TOKEN is not set (put it in .env or the environment)")
    if not _TOKEN_SHAPE.match(token):
        raise ValueError("DISCORD_TOKEN does not look like a bot token (three dot-separated parts)")
    return token


def main() -> int:
    from dotenv import load_dotenv

    from storyengine.config import Settings
    from storyengine.errors import ConfigError

    from .settings import BotSettings

    load_dotenv(override=False)
    try:
        token = read_token(os.environ)
        settings = Settings.from_env(dotenv=False)
        bot_settings = BotSettings.from_env(os.environ)
    except (ValueError, ConfigError) as exc:
        print(f"taleweaver-bot: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    try:
        return asyncio.run(_run(token, settings, bot_settings))
    except KeyboardInterrupt:
        return 0


async def _run(token: str, settings: Settings, bot_settings: BotSettings) -> int:
    import discord

    from storyengine.engine import StoryEngine

    from .client import StoryBot

    bot = StoryBot(engine=StoryEngine(settings), settings=bot_settings)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
    try:
        async with bot:
            await bot.start(token)
    except discord.LoginFailure:
        print("taleweaver-bot: error: Discord refused the token (DISCORD_TOKEN)", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
