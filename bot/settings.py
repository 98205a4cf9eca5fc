"""The bot's own settings (the engine's are `storyengine.Settings`)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from storyengine.errors import ConfigError


@dataclass(frozen=True)
class BotSettings:
    dev_guild_id: int | None = None
    """Sync commands to this guild only (instant), instead of globally (up to an hour)."""
    cooldown_s: float = 5.0
    """Per-user pause between generating commands."""
    edit_interval_s: float = 1.0
    """At most one edit of a growing message per this many seconds."""
    turn_check_s: float = 15.0
    """How often round-robin deadlines are checked."""
    train_min_new_feedback: int = 50
    """Reactions and choices since the last training round that start a new one."""
    train_interval_s: float | None = 6 * 3600
    """Least time between automatic training rounds; None: only `/storyadmin train`."""
    train_check_s: float = 60.0
    """How often the training schedule is checked."""
    admin_guild_ids: frozenset[int] = frozenset()
    """Servers whose admins may train and roll back the shared adapter (empty: any)."""
    health_port: int | None = None
    """Serve /health and /metrics on this port (None: no health server; 0: any free port)."""
    health_host: str = "127.0.0.1"
    """The address the health server listens on (loopback: this machine only)."""

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BotSettings:
        def number(name: str, default: float, low: float, high: float) -> float:
            raw = (environ.get(name) or "").strip()
            if not raw:
                return default
            try:
                value = float(raw)
            except ValueError:
                raise ConfigError(f"{name}: expected a number, got {raw!r}") from None
            if not low <= value <= high:
                raise ConfigError(f"{name}: must be {low:g}..{high:g}, got {raw}")
            return value

        def ids(name: str) -> frozenset[int]:
            parts = [p.strip() for p in (environ.get(name) or "").split(",") if p.strip()]
            if not all(p.isdigit() for p in parts):
                raise ConfigError(f"{name}: expected server ids (digits) separated by commas")
            return frozenset(int(p) for p in parts)

        port = (environ.get("BOT_HEALTH_PORT") or "").strip()
        if port and not (port.isdigit() and int(port) <= 65535):
            raise ConfigError(f"BOT_HEALTH_PORT: expected a port number 0..65535, got {port!r}")
        host = (environ.get("BOT_HEALTH_HOST") or "").strip() or "127.0.0.1"
        if any(c.isspace() for c in host) or "/" in host:
            raise ConfigError(f"BOT_HEALTH_HOST: expected an address such as 0.0.0.0, got {host!r}")
        guild = (environ.get("DEV_GUILD_ID") or "").strip()
        if guild and not guild.isdigit():
            raise ConfigError(f"DEV_GUILD_ID: expected a server id (digits), got {guild!r}")
        return cls(
            dev_guild_id=int(guild) if guild else None,
            cooldown_s=number("BOT_COOLDOWN", 5.0, 0.0, 600.0),
            edit_interval_s=number("BOT_EDIT_INTERVAL", 1.0, 0.2, 10.0),
            turn_check_s=number("BOT_TURN_CHECK", 15.0, 0.05, 600.0),
            train_min_new_feedback=int(number("TRAIN_MIN_NEW_FEEDBACK", 50, 1, 1_000_000)),
            train_interval_s=duration("TRAIN_INTERVAL", environ.get("TRAIN_INTERVAL")),
            train_check_s=number("BOT_TRAIN_CHECK", 60.0, 0.05, 3600.0),
            admin_guild_ids=ids("BOT_ADMIN_GUILDS"),
            health_port=int(port) if port else None,
            health_host=host,
        )


DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(name: str, raw: str | None, default: float = 6 * 3600) -> float | None:
    """'6h', '30m', '90s', '1d', plain seconds, or 'off' (None)."""
    raw = (raw or "").strip().lower()
    if not raw:
        return default
    if raw == "off":
        return None
    unit = DURATION_UNITS.get(raw[-1])
    number = raw[:-1] if unit else raw
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ConfigError(f"{name}: expected a duration like 6h, 30m or 3600, or off") from None
    if not 60 <= seconds <= 365 * 86400:
        raise ConfigError(f"{name}: must be between 1 minute and a year, got {raw}")
    return seconds
