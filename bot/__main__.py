"""`taleweaver-bot` / `python -m bot`: run the Discord bot.

Reads DISCORD_TOKEN and the engine's STORY_* settings from the environment or `.env`.
A missing or malformed token, a bad setting or a token Discord refuses ends it with one
line and exit code 2 (fix the configuration; restarting will not help); Discord out of
reach ends it with one line and exit code 1 (try again later). SIGTERM or Ctrl-C stop it
cleanly within 10 seconds.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import platform
import re
import signal
import sys
import threading
from collections.abc import Sequence
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


HELP_EPILOG = """\
Settings come from the environment, or from a .env file in the directory it is started
from (the environment wins); .env.example lists every one. The main ones:
  DISCORD_TOKEN      the bot's token (required)
  STORY_DATA_DIR     where the database, the adapters and the logs go (default: here)
  STORY_LOG_LEVEL    DEBUG, INFO (default for the bot), WARNING or ERROR
  BOT_HEALTH_PORT    serve /health and /metrics on this port (BOT_HEALTH_HOST: 127.0.0.1)
  DEV_GUILD_ID       sync the slash commands to this one server, at once
It stops cleanly on Ctrl-C or SIGTERM. Exit codes: 0 stopped, 1 Discord out of reach
(try again), 2 bad configuration (fix it first)."""


def build_parser() -> argparse.ArgumentParser:
    from storyengine.version import __version__

    parser = argparse.ArgumentParser(
        prog="taleweaver-bot",
        description="Run Taleweaver's Discord bot: stories told with your server.",
        epilog=HELP_EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action="version", version=f"taleweaver-bot {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from dotenv import find_dotenv, load_dotenv

    from storyengine.config import Settings
    from storyengine.errors import ConfigError

    from .settings import BotSettings

    build_parser().parse_args(argv)
    # Until the event loop takes the signals over (after the imports and the settings),
    # SIGTERM ends the start-up at once, quietly: there is nothing to save yet.
    signal.signal(signal.SIGTERM, _stop_while_starting)
    # `.env` in the directory the bot is started from (not the package's folder).
    load_dotenv(find_dotenv(usecwd=True), override=False)
    try:
        token = read_token(os.environ)
        settings = Settings.from_env(dotenv=False, default_log_level="INFO")
        bot_settings = BotSettings.from_env(os.environ)
    except (ValueError, ConfigError) as exc:
        print(f"taleweaver-bot: error: {exc}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=settings.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    # A service's log is no terminal: no download bars in it (the start-up lines say
    # what is loading).
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    log_start(settings)
    try:
        return asyncio.run(_run(token, settings, bot_settings))
    except KeyboardInterrupt:
        return 0


def _stop_while_starting(signum: int, frame: object) -> None:
    raise SystemExit(130)


def log_start(settings: Settings) -> None:
    """The first lines of the log: what runs, and from where (absolute paths, so a bot
    started from the wrong directory shows it at once)."""
    import discord

    from storyengine.version import __version__

    log = logging.getLogger("bot")
    log.info(
        "Taleweaver %s (Python %s, discord.py %s), pid %d, working directory %s",
        __version__,
        platform.python_version(),
        discord.__version__,
        os.getpid(),
        os.getcwd(),
    )
    log.info("data directory: %s", os.path.abspath(settings.data_dir))


STOP_DEADLINE_S = 9.0
"""After SIGTERM or Ctrl-C the bot exits within this many seconds, whatever is running;
a second signal exits at once."""


async def _run(token: str, settings: Settings, bot_settings: BotSettings) -> int:
    import aiohttp
    import discord

    from storyengine import StoryEngine

    from .client import make_bot

    bot = make_bot(StoryEngine(settings), bot_settings)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def on_signal(signum: int) -> None:
        if stop.is_set():  # the second signal: no more waiting
            print("taleweaver-bot: stopped at once (second signal)", file=sys.stderr)
            os._exit(130)
        logging.getLogger(__name__).info(
            "%s: stopping (a second signal stops at once)", signal.Signals(signum).name
        )
        stop.set()
        _exit_after(STOP_DEADLINE_S)

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    try:
        async with bot:
            running = asyncio.create_task(bot.start(token), name="bot")
            stopping = asyncio.create_task(stop.wait(), name="stop-signal")
            await asyncio.wait({running, stopping}, return_when=asyncio.FIRST_COMPLETED)
            if stop.is_set():
                if not running.done() and not bot.is_ready():
                    running.cancel()  # still starting (loading the model): nothing to save
                await bot.close()
            stopping.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await running
    except discord.LoginFailure:
        print("taleweaver-bot: error: Discord refused the token (DISCORD_TOKEN)", file=sys.stderr)
        return 2
    except (aiohttp.ClientError, OSError, discord.GatewayNotFound, discord.HTTPException) as exc:
        reason = exc.__class__.__name__ + (f": {exc}" if str(exc) else "")
        print(
            f"taleweaver-bot: error: cannot reach Discord ({reason}); check the network "
            "and try again",
            file=sys.stderr,
        )
        return 1
    return 0


def _exit_after(seconds: float) -> None:
    """A last resort: if stopping hangs (a stuck thread, a lost connection), end the
    process anyway. What is committed stays committed; SQLite recovers the rest."""

    def expire() -> None:
        print(f"taleweaver-bot: still stopping after {seconds:.0f} s; exiting", file=sys.stderr)
        os._exit(1)

    timer = threading.Timer(seconds, expire)
    timer.daemon = True
    timer.start()


if __name__ == "__main__":
    raise SystemExit(main())
