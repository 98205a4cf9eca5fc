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

        guild = (environ.get("DEV_GUILD_ID") or "").strip()
        if guild and not guild.isdigit():
            raise ConfigError(f"DEV_GUILD_ID: expected a server id (digits), got {guild!r}")
        return cls(
            dev_guild_id=int(guild) if guild else None,
            cooldown_s=number("BOT_COOLDOWN", 5.0, 0.0, 600.0),
            edit_interval_s=number("BOT_EDIT_INTERVAL", 1.0, 0.2, 10.0),
            turn_check_s=number("BOT_TURN_CHECK", 15.0, 0.05, 600.0),
        )
