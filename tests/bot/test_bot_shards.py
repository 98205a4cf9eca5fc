"""Sharded bot processes (BOT_SHARD_COUNT, BOT_SHARD_IDS): the settings, the engine's
turn expiry limited to a process's own servers, and two real bot processes, one per
shard, sharing one PostgreSQL database behind the fake Discord."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

import pytest

from bot.settings import BotSettings
from storyengine.errors import ConfigError
from storyengine.records import Author
from tests.helpers.fake_discord import (
    GUILD_ID,
    SECOND_CHANNEL,
    SECOND_GUILD_ID,
    TEXT_CHANNEL,
    TOKEN,
    FakeDiscord,
    FakeUser,
    shard_of,
)

HERE = Path(__file__).parents[1] / "helpers"
ANN = FakeUser(101, "Ann")
BEN = FakeUser(102, "Ben")


def test_the_two_test_servers_fall_on_different_shards():
    assert (shard_of(GUILD_ID, 2), shard_of(SECOND_GUILD_ID, 2)) == (0, 1)


def test_shard_settings_are_read_and_checked():
    plain = BotSettings.from_env({})
    assert (plain.shard_count, plain.shard_ids, plain.sharded) == (None, (), False)
    assert plain.syncs_commands and plain.owns_guild(SECOND_GUILD_ID)

    first = BotSettings.from_env({"BOT_SHARD_COUNT": "2", "BOT_SHARD_IDS": "0"})
    second = BotSettings.from_env({"BOT_SHARD_COUNT": "2", "BOT_SHARD_IDS": " 1, "})
    assert first.sharded and first.own_shards == (0,) and second.own_shards == (1,)
    assert first.syncs_commands and not second.syncs_commands  # exactly one syncs
    assert first.runs_training_clock and not second.runs_training_clock  # one clock
    assert first.owns_guild(GUILD_ID) and not first.owns_guild(SECOND_GUILD_ID)
    assert second.owns_guild(SECOND_GUILD_ID) and not second.owns_guild(GUILD_ID)
    every = BotSettings.from_env({"BOT_SHARD_COUNT": "3"})
    assert every.own_shards == (0, 1, 2) and every.syncs_commands
    deduplicated = BotSettings.from_env({"BOT_SHARD_COUNT": "4", "BOT_SHARD_IDS": "3,1,3"})
    assert deduplicated.shard_ids == (1, 3)
    told = {"BOT_SHARD_COUNT": "2", "BOT_SHARD_IDS": "1", "BOT_SYNC_COMMANDS": "yes"}
    assert BotSettings.from_env(told).syncs_commands
    assert not BotSettings.from_env({"BOT_SYNC_COMMANDS": "false"}).syncs_commands

    for environ, message in [
        ({"BOT_SHARD_IDS": "0"}, "BOT_SHARD_IDS: needs BOT_SHARD_COUNT"),
        ({"BOT_SHARD_COUNT": "2", "BOT_SHARD_IDS": "0,2"}, "below BOT_SHARD_COUNT"),
        ({"BOT_SHARD_COUNT": "2", "BOT_SHARD_IDS": "one"}, "BOT_SHARD_IDS: expected shard ids"),
        ({"BOT_SHARD_COUNT": "0"}, "BOT_SHARD_COUNT: must be"),
        ({"BOT_SYNC_COMMANDS": "maybe"}, "BOT_SYNC_COMMANDS: expected true or false"),
    ]:
        with pytest.raises(ConfigError, match=message):
            BotSettings.from_env(environ)
    with pytest.raises(ConfigError, match="below"):
        BotSettings(shard_count=1, shard_ids=(1,))


def test_the_bot_is_sharded_only_when_asked():
    import discord

    from bot.client import ShardedStoryBot, StoryBot, shard_options

    assert shard_options(BotSettings()) == {}
    assert shard_options(BotSettings(shard_count=2, shard_ids=(1,))) == {
        "shard_count": 2,
        "shard_ids": [1],
    }
    assert not issubclass(StoryBot, discord.AutoShardedClient)
    assert issubclass(ShardedStoryBot, discord.AutoShardedClient)


async def test_turns_expire_only_for_the_communities_asked(tiny_engine):
    engine = tiny_engine
    now = [1_000_000.0]
    engine.clock = lambda: now[0]
    ann, ben = Author("1", "Ann"), Author("2", "Ben")
    for channel, community in (("10", "1000"), ("20", "2000"), ("30", "dm")):
        await engine.start_story(
            channel, "Once upon a time.", author=ann, mode="round-robin", community=community
        )
        await engine.join(channel, ben)
    now[0] += 601
    assert await engine.expire_turns([]) == []
    moved = await engine.expire_turns({"2000"})
    assert [(c, s.current.user_name) for c, s in moved] == [("20", "Ben")]
    moved = await engine.expire_turns([1000, "dm"])  # server ids as numbers too
    assert sorted(c for c, _ in moved) == ["10", "30"]
    now[0] += 601
    assert sorted(c for c, _ in await engine.expire_turns()) == ["10", "20", "30"]  # every one


async def test_games_whose_server_is_not_known_are_passed_by_shard_zero(tiny_engine):
    """Stories older than the record of communities (and any with none) belong to no
    shard's servers: the process holding shard 0 passes their turns, and only it."""
    from bot.client import StoryBot
    from bot.settings import BotSettings
    from storyengine.records import UNKNOWN_SERVER

    engine = tiny_engine
    now = [1_000_000.0]
    engine.clock = lambda: now[0]
    ann, ben = Author("1", "Ann"), Author("2", "Ben")
    for channel, community in (("40", UNKNOWN_SERVER), ("50", None)):
        await engine.start_story(
            channel, "Once upon a time.", author=ann, mode="round-robin", community=community
        )
        await engine.join(channel, ben)
    now[0] += 601
    zero = StoryBot(engine=engine, settings=BotSettings(shard_count=2, shard_ids=(0,)))
    one = StoryBot(engine=engine, settings=BotSettings(shard_count=2, shard_ids=(1,)))
    assert await engine.expire_turns(one.own_communities()) == []
    assert sorted(c for c, _ in await engine.expire_turns(zero.own_communities())) == ["40", "50"]


class ShardProcess:
    """`taleweaver-bot` as its own process running some shards (tests/helpers/bot_process.py:
    the real entry point, Discord's addresses replaced), its log in a file."""

    def __init__(self, fake: FakeDiscord, folder: Path, **env: str) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        self.folder, self.log_path = folder, folder / "bot.log"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith(("STORY_", "BOT_"))},
            "FAKE_DISCORD": f"http://127.0.0.1:{fake.port}",
            "DISCORD_TOKEN": TOKEN,
            "STORY_DEVICE": "cpu",
            "STORY_LOG_LEVEL": "INFO",
            "BOT_COOLDOWN": "0",
            "BOT_EDIT_INTERVAL": "0.2",
            "TRAIN_INTERVAL": "off",
            "HF_HUB_OFFLINE": "1",
            **env,
        }
        self.process: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        with self.log_path.open("wb") as log:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable,
                str(HERE / "bot_process.py"),
                env=self.env,
                cwd=self.folder,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
            )

    @property
    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    async def stop(self) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(self.process.wait(), 30)

    async def kill(self) -> None:
        if self.process is not None and self.process.returncode is None:
            self.process.kill()
            await self.process.wait()


def replies(fake: FakeDiscord, record) -> list[str]:
    ids = ([record.original_id] if record.original_id else []) + record.followups
    return [fake.messages[i]["content"] for i in ids if i in fake.messages]


async def said(fake: FakeDiscord, record, text: str, seconds: float = 120) -> None:
    await fake.wait_for(lambda: any(text in c for c in replies(fake, record)), seconds)


async def finished(fake: FakeDiscord, record) -> None:
    await fake.wait_for(
        lambda: record.original_id and fake.reactions_on(record.original_id) == ["👍", "👎"],
        120,
    )


async def play_until_bens_turn(fake: FakeDiscord, channel: int) -> None:
    """Ann starts a round-robin game, Ben joins, Ann takes her turn: Ben's turn now."""
    start = await fake.slash(
        ANN, channel, "start", premise="Once upon a time, two friends.", mode="round-robin"
    )
    await finished(fake, start)
    await said(fake, start, "It is **Ann**'s turn")
    join = await fake.slash(BEN, channel, "join")
    await said(fake, join, "Ben joins")
    line = await fake.slash(ANN, channel, "continue", text="Ann opens the door.")
    await finished(fake, line)
    await said(fake, line, "It is **Ben**'s turn")


def time_up(fake: FakeDiscord, channel: int) -> list[str]:
    return [m["content"] for m in fake.bot_messages(channel) if "Time is up" in m["content"]]


@pytest.mark.slow
async def test_two_shard_processes_share_the_database_and_each_expires_its_own(tmp_path):
    from tests.helpers.postgres import fresh_database

    async with fresh_database() as url:
        fake = FakeDiscord(guilds=(GUILD_ID, SECOND_GUILD_ID))
        await fake.start()
        ahead = tmp_path / "clock-ahead"
        ahead.write_text("0")
        shared = {
            "STORY_DB_URL": url,
            "STORY_ADAPTER_DIR": str(tmp_path / "adapters"),
            "STORY_MAX_NEW_TOKENS": "8",
            "BOT_SHARD_COUNT": "2",
            "BOT_TURN_CHECK": "0.2",
            "FAKE_CLOCK_FILE": str(ahead),
        }
        bots = [
            ShardProcess(fake, tmp_path / f"shard{i}", BOT_SHARD_IDS=str(i), **shared)
            for i in (0, 1)
        ]
        try:
            await asyncio.gather(*(bot.start() for bot in bots))
            await fake.wait_for(
                lambda: all("logged in as" in bot.log for bot in bots) and fake.commands, 240
            )
            assert sorted(fake.identified_shards) == [(0, 2), (1, 2)]
            assert fake.shards_connected == {0, 1}
            assert "1 servers" in bots[0].log and "1 servers" in bots[1].log

            # A game on each shard's server, both going on at once.
            await asyncio.gather(
                play_until_bens_turn(fake, TEXT_CHANNEL),
                play_until_bens_turn(fake, SECOND_CHANNEL),
            )

            # Ben lets his time run out in both: each expiry is announced exactly once.
            ahead.write_text("601")
            await fake.wait_for(
                lambda: time_up(fake, TEXT_CHANNEL) and time_up(fake, SECOND_CHANNEL), 60
            )
            await asyncio.sleep(2.0)  # ten more turn checks in each process
            for channel in (TEXT_CHANNEL, SECOND_CHANNEL):
                notices = time_up(fake, channel)
                assert len(notices) == 1, notices
                assert "It is **Ann**'s turn" in notices[0]
            # Each by the process that serves that server (the other never asked for it).
            assert f"time up in channel {TEXT_CHANNEL}," in bots[0].log
            assert f"time up in channel {SECOND_CHANNEL}," in bots[1].log
            assert "time up in channel" not in bots[0].log.replace(
                f"time up in channel {TEXT_CHANNEL},", ""
            )
            assert "time up in channel" not in bots[1].log.replace(
                f"time up in channel {SECOND_CHANNEL},", ""
            )
            assert not [c for c in fake.calls if c.method == "GET" and "/channels/" in c.path]

            # The game goes on after the expiry, on the shard-1 server too.
            again = await fake.slash(ANN, SECOND_CHANNEL, "continue", text="Ann goes on.")
            await finished(fake, again)
            await said(fake, again, "It is **Ben**'s turn")

            # Only the process holding shard 0 synced the commands.
            syncs = [c for c in fake.calls if c.method == "PUT" and c.path.endswith("/commands")]
            assert len(syncs) == 1
            assert "synced by another process" in bots[1].log
            assert "synced by another process" not in bots[0].log

            codes = await asyncio.gather(*(bot.stop() for bot in bots))
            assert codes == [0, 0], [bot.log[-3000:] for bot in bots]
            for bot in bots:
                assert "Traceback" not in bot.log, bot.log
        finally:
            for bot in bots:
                await bot.kill()
            await fake.stop()
        assert fake.unexpected == []
