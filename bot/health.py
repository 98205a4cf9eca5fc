"""A health signal for whoever supervises the bot (Docker's healthcheck, systemd, an
uptime monitor) and metrics for Prometheus: a small aiohttp server, `BOT_HEALTH_PORT`.

- `GET /health`: 200 when the bot is connected to Discord's gateway and its heartbeat
  is fresh, its database answers, and its generator's worker is alive; 503 otherwise
  (or while it starts). The body says which part failed, as JSON.
- `GET /metrics`: Prometheus' text format (version 0.0.4): commands handled (and in
  the last minute), continuations written by outcome, the generation queue, reactions
  recorded, training rounds by outcome, the gateway's state.

It listens on 127.0.0.1 unless `BOT_HEALTH_HOST` says otherwise, and shows nothing
secret: no token, no paths, no user or server ids, no story text.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import deque
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from aiohttp import web

from storyengine.version import __version__

if TYPE_CHECKING:
    from .client import StoryBot

log = logging.getLogger(__name__)

DATABASE_TIMEOUT_S = 2.0
"""The database must answer `SELECT 1` within this long."""
STALE_HEARTBEAT_S = 90.0
"""A gateway heartbeat acknowledged longer ago than this (or 2.5 heartbeat intervals,
whichever is longer) makes the bot unhealthy: the connection is probably dead."""
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class Metrics:
    """Counters the bot keeps itself (the others are read from the engine at scrape
    time): commands and button presses by name, and their times in the last minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.commands: dict[str, int] = {}
        self._recent: deque[float] = deque()

    def command(self, name: str) -> None:
        self.commands[name] = self.commands.get(name, 0) + 1
        self._recent.append(self.clock())
        self._trim()

    def commands_per_minute(self) -> int:
        self._trim()
        return len(self._recent)

    def _trim(self) -> None:
        cutoff = self.clock() - 60.0
        while self._recent and self._recent[0] < cutoff:
            self._recent.popleft()


def interaction_name(data: dict[str, Any] | None, kind: str) -> str:
    """A bounded label for an interaction: `story start`, `storyadmin stats`, `button
    continue`. Ids and user text never become labels."""
    data = data or {}
    if kind == "application_command":
        parts = [str(data.get("name", "?"))]
        for option in data.get("options") or []:
            if option.get("type") in (1, 2):  # a subcommand (group)
                parts.append(str(option.get("name", "?")))
                break
        return " ".join(parts)[:64]
    if kind == "component":
        custom = str(data.get("custom_id", ""))
        pieces = custom.split(":")
        return "button " + (pieces[1] if len(pieces) > 1 and pieces[0] == "tw" else "other")
    return kind


def heartbeat_age(bot: StoryBot) -> tuple[float | None, float | None]:
    """(seconds since the gateway last acknowledged a heartbeat, the heartbeat interval),
    or (None, None) when there is no connection. discord.py keeps these on its
    keep-alive thread, which has no public API; read defensively."""
    keep_alive = getattr(getattr(bot, "ws", None), "_keep_alive", None)
    last_ack = getattr(keep_alive, "_last_ack", None)
    if keep_alive is None or not isinstance(last_ack, float):
        return None, None
    return time.perf_counter() - last_ack, getattr(keep_alive, "interval", None)


async def database_ok(bot: StoryBot) -> bool:
    try:
        return await asyncio.wait_for(bot.engine.database_reachable(), DATABASE_TIMEOUT_S)
    except Exception:  # closed, locked, gone: all mean "not reachable"
        return False


def narrator(bot: StoryBot) -> Any:
    try:
        return bot.engine.narrator
    except RuntimeError:  # the engine has not started (the model is loading)
        return None


def generator(bot: StoryBot) -> Any:
    story_narrator = narrator(bot)
    return story_narrator.generator if story_narrator is not None else None


async def check(bot: StoryBot) -> dict[str, Any]:
    """Every part's state, and `healthy` when all are well."""
    age, interval = heartbeat_age(bot)
    stale_after = max(STALE_HEARTBEAT_S, 2.5 * (interval or 0))
    gateway = bot.gateway_connected and not bot.is_closed()
    heartbeat_fresh = age is not None and age <= stale_after
    gen = generator(bot)
    alive = bool(getattr(gen, "alive", True)) if gen is not None else False
    database = await database_ok(bot)
    healthy = gateway and heartbeat_fresh and database and alive
    status = "ok" if healthy else ("starting" if not bot.is_ready() else "unhealthy")
    return {
        "status": status,
        "healthy": healthy,
        "version": __version__,
        "uptime_s": round(time.monotonic() - bot.started_at, 1),
        "gateway": {
            "connected": gateway,
            "heartbeat_age_s": None if age is None else round(age, 1),
            "heartbeat_fresh": heartbeat_fresh,
            "latency_ms": None if bot.latency == float("inf") else round(bot.latency * 1000),
        },
        "database": {"reachable": database},
        "generator": {"alive": alive},
    }


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _family(
    name: str, kind: str, help_text: str, samples: Iterable[tuple[dict[str, str], float]]
) -> list[str]:
    lines = [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}"]
    for labels, value in samples:
        rendered = ",".join(f'{k}="{_label(v)}"' for k, v in sorted(labels.items()))
        lines.append(f"{name}{{{rendered}}} {value:g}" if rendered else f"{name} {value:g}")
    return lines


async def render_metrics(bot: StoryBot) -> str:
    state = await check(bot)
    gen = generator(bot)
    engine = bot.engine
    story_narrator = narrator(bot)
    outcomes = dict(story_narrator.outcomes) if story_narrator is not None else {}
    training = bot.training
    age = state["gateway"]["heartbeat_age_s"]
    families = [
        _family("taleweaver_up", "gauge", "1 while /health answers 200.", [({}, state["healthy"])]),
        _family(
            "taleweaver_info", "gauge", "The running release.", [({"version": __version__}, 1)]
        ),
        _family(
            "taleweaver_gateway_connected",
            "gauge",
            "1 while connected to Discord's gateway.",
            [({}, state["gateway"]["connected"])],
        ),
        _family(
            "taleweaver_heartbeat_age_seconds",
            "gauge",
            "Seconds since the gateway last acknowledged a heartbeat.",
            [({}, age)] if age is not None else [],
        ),
        _family("taleweaver_guilds", "gauge", "Servers the bot is in.", [({}, len(bot.guilds))]),
        _family(
            "taleweaver_commands_total",
            "counter",
            "Slash commands and button presses received, by command.",
            [({"command": k}, v) for k, v in sorted(bot.metrics.commands.items())],
        ),
        _family(
            "taleweaver_commands_per_minute",
            "gauge",
            "Slash commands and button presses received in the last 60 seconds.",
            [({}, bot.metrics.commands_per_minute())],
        ),
        _family(
            "taleweaver_generations_total",
            "counter",
            "Continuations written, by how they ended (eos, length, cancelled, failed).",
            [({"outcome": k}, v) for k, v in sorted(outcomes.items())],
        ),
        _family(
            "taleweaver_generation_queue_depth",
            "gauge",
            "Continuations waiting to be admitted to the batch.",
            [({}, getattr(gen, "waiting", 0) if gen is not None else 0)],
        ),
        _family(
            "taleweaver_generations_running",
            "gauge",
            "Continuations being written now.",
            [({}, getattr(gen, "running", 0) if gen is not None else 0)],
        ),
        _family(
            "taleweaver_reactions_recorded_total",
            "counter",
            "Reactions added or removed on story messages and recorded as feedback.",
            [({}, engine.reactions.recorded)],
        ),
        _family(
            "taleweaver_training_rounds_total",
            "counter",
            "Training rounds this process ran, by outcome.",
            [({"outcome": k}, v) for k, v in sorted(training.outcomes.items())],
        ),
        _family(
            "taleweaver_training_running",
            "gauge",
            "1 while a training round runs.",
            [({}, training.running)],
        ),
    ]
    return "\n".join(line for family in families for line in family) + "\n"


class HealthServer:
    """The aiohttp server behind `/health` and `/metrics`."""

    def __init__(self, bot: StoryBot, host: str, port: int) -> None:
        self.bot = bot
        self.host = host
        self.port = port
        self._runner: web.AppRunner | None = None

    async def start(self) -> int:
        """Listen; returns the port (the one picked when asked for port 0)."""
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/metrics", self._metrics)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        server = site._server  # aiohttp keeps the bound sockets there
        sockets = getattr(server, "sockets", None) or []
        if sockets:
            self.port = int(sockets[0].getsockname()[1])
        return self.port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, request: web.Request) -> web.Response:
        state = await check(self.bot)
        return web.Response(
            text=json.dumps(state) + "\n",
            status=200 if state["healthy"] else 503,
            content_type="application/json",
        )

    async def _metrics(self, request: web.Request) -> web.Response:
        try:
            body = await render_metrics(self.bot)
        except Exception:
            log.exception("rendering metrics failed")
            raise web.HTTPInternalServerError() from None
        return web.Response(body=body.encode(), headers={"Content-Type": CONTENT_TYPE})
