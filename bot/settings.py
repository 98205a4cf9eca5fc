"""The bot's own settings (the engine's are `storyengine.Settings`), described as the
engine's are: each field says its variable, its help and its bounds (`option`), one loop
reads them all, and every object is checked when it is made."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from storyengine.errors import ConfigError
from storyengine.options import check_settings, option, read_env

DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def duration(raw: str) -> float | None:
    """'6h', '30m', '90s', '1d', plain seconds, or 'off' (None); between a minute and a
    year."""
    raw = raw.strip().lower()
    if raw == "off":
        return None
    unit = DURATION_UNITS.get(raw[-1:])
    number = raw[:-1] if unit else raw
    try:
        seconds = float(number) * (unit or 1)
    except ValueError:
        raise ValueError(f"expected a duration like 6h, 30m or 3600, or off, got {raw!r}") from None
    if not 60 <= seconds <= 365 * 86400:
        raise ValueError(f"must be between 1 minute and a year, got {raw}")
    return seconds


def _server_id(raw: str) -> int:
    if not raw.isdigit():
        raise ValueError(f"expected a server id (digits), got {raw!r}")
    return int(raw)


def _server_ids(raw: str) -> frozenset[int]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError("expected server ids (digits) separated by commas")
    return frozenset(int(p) for p in parts)


def _shard_ids(raw: str) -> tuple[int, ...]:
    parts = [p.strip() for p in raw.split(",") if p.strip()]
    if not all(p.isdigit() for p in parts):
        raise ValueError("expected shard ids (whole numbers from 0) separated by commas")
    return tuple(sorted({int(p) for p in parts}))


def _flag(raw: str) -> bool:
    value = raw.strip().lower()
    if value in ("1", "true", "yes", "on"):
        return True
    if value in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"expected true or false, got {raw!r}")


def _host(value: str) -> str | None:
    bad = not value or any(c.isspace() for c in value) or "/" in value
    return "an address such as 0.0.0.0" if bad else None


@dataclass(frozen=True)
class BotSettings:
    dev_guild_id: int | None = option(
        None,
        env="DEV_GUILD_ID",
        parse=_server_id,
        help="sync slash commands to this server only (instant), not globally (up to an hour)",
    )
    cooldown_s: float = option(
        5.0,
        env="BOT_COOLDOWN",
        low=0,
        high=600,
        help="seconds a user waits between commands that write",
    )
    edit_interval_s: float = option(
        1.0,
        env="BOT_EDIT_INTERVAL",
        low=0.2,
        high=10,
        help="at most one edit of a growing message per this many seconds",
    )
    turn_check_s: float = option(
        15.0,
        env="BOT_TURN_CHECK",
        low=0.05,
        high=600,
        help="how often (seconds) round-robin deadlines are checked",
    )
    train_min_new_feedback: int = option(
        50,
        env="TRAIN_MIN_NEW_FEEDBACK",
        low=1,
        high=1_000_000,
        help="reactions and choices since the last training round that start a new one",
    )
    train_interval_s: float | None = option(
        6 * 3600,
        env="TRAIN_INTERVAL",
        parse=duration,
        low=0,
        help="least time between automatic training rounds (None, 'off': only /storyadmin train)",
    )
    train_mode: str = option(
        "local",
        env="TRAIN_MODE",
        parse=str.lower,
        choices=("local", "external"),
        help="local: rounds run as the bot's child process; external: a round due is "
        "recorded in the database for `storyengine train worker` on another machine",
    )
    train_check_s: float = option(
        60.0,
        env="BOT_TRAIN_CHECK",
        low=0.05,
        high=3600,
        help="how often (seconds) the training schedule is checked",
    )
    admin_guild_ids: frozenset[int] = option(
        frozenset(),
        env="BOT_ADMIN_GUILDS",
        parse=_server_ids,
        help="servers whose admins may train and roll back the shared adapter (empty: any)",
    )
    health_port: int | None = option(
        None,
        env="BOT_HEALTH_PORT",
        low=0,
        high=65535,
        help="serve /health and /metrics on this port (None: no health server; 0: any free)",
    )
    health_host: str = option(
        "127.0.0.1",
        env="BOT_HEALTH_HOST",
        check=_host,
        help="the address the health server listens on (loopback: this machine only)",
    )

    shard_count: int | None = option(
        None,
        env="BOT_SHARD_COUNT",
        low=1,
        high=100_000,
        help="how many shards the bot's servers are split into, across every process "
        "(None: one connection, no sharding)",
    )
    shard_ids: tuple[int, ...] = option(
        (),
        env="BOT_SHARD_IDS",
        parse=_shard_ids,
        help="the shards this process runs, comma-separated, each below BOT_SHARD_COUNT "
        "(empty: all of them)",
    )
    sync_commands: bool | None = option(
        None,
        env="BOT_SYNC_COMMANDS",
        parse=_flag,
        help="whether this process syncs the slash commands (None: when it holds shard 0, "
        "or when there are no shards; exactly one process should)",
    )

    def __post_init__(self) -> None:
        check_settings(self)
        if self.shard_ids and self.shard_count is None:
            raise ConfigError("BOT_SHARD_IDS: needs BOT_SHARD_COUNT (how many shards in all)")
        too_high = [i for i in self.shard_ids if self.shard_count and i >= self.shard_count]
        if too_high:
            raise ConfigError(
                f"BOT_SHARD_IDS: each must be below BOT_SHARD_COUNT ({self.shard_count}),"
                f" got {', '.join(map(str, too_high))}"
            )

    @property
    def sharded(self) -> bool:
        """Whether the bot runs shards (an `AutoShardedBot`), not one plain connection."""
        return self.shard_count is not None

    @property
    def own_shards(self) -> tuple[int, ...]:
        """The shards this process runs (all of them when BOT_SHARD_IDS is empty)."""
        if self.shard_count is None:
            return (0,)
        return self.shard_ids or tuple(range(self.shard_count))

    @property
    def syncs_commands(self) -> bool:
        """Whether this process syncs the slash commands: BOT_SYNC_COMMANDS, else only
        the process that holds shard 0 (or the only process)."""
        if self.sync_commands is not None:
            return self.sync_commands
        return 0 in self.own_shards

    @property
    def runs_training_clock(self) -> bool:
        """Whether this process starts automatic training rounds: one clock is enough
        for processes sharing a database, so only the one holding shard 0 (or the only
        process) runs it; `/storyadmin train` works from any."""
        return self.train_interval_s is not None and 0 in self.own_shards

    def owns_guild(self, guild_id: int) -> bool:
        """Whether the server falls on one of this process's shards (Discord's rule)."""
        if self.shard_count is None:
            return True
        return (guild_id >> 22) % self.shard_count in self.own_shards

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> BotSettings:
        return cls(**read_env(cls, environ))
