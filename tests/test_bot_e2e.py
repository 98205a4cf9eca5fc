"""The real discord.py client, running the real bot, against the fake Discord."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket
from fake_discord import TEXT_CHANNEL, TOKEN, FakeDiscord, FakeUser

from bot.client import StoryBot
from bot.settings import BotSettings
from storyengine.config import Settings
from storyengine.engine import StoryEngine
from storyengine.sampling import SamplingParams
from storyengine.scheduler import BatchingGenerator

pytestmark = pytest.mark.slow

ANN = FakeUser(101, "Ann")
BEN = FakeUser(102, "Ben")
CAT = FakeUser(103, "Cat")
MOD = FakeUser(104, "Mo", moderator=True)


@dataclass
class Env:
    fake: FakeDiscord
    bot: StoryBot
    engine: StoryEngine
    task: asyncio.Task[None]


class Harness:
    def __init__(self, fake: FakeDiscord, db: Path, model) -> None:
        self.fake, self.db, self.model = fake, db, model
        self.env: Env | None = None

    async def start(self, *, turn_check_s: float = 0.1) -> Env:
        settings = Settings(
            db_path=self.db, device="cpu", sampling=SamplingParams(max_new_tokens=24, seed=3)
        )
        engine = StoryEngine(settings, generator=BatchingGenerator(self.model))
        bot = StoryBot(
            engine=engine,
            settings=BotSettings(cooldown_s=0.0, edit_interval_s=0.2, turn_check_s=turn_check_s),
        )
        self.fake.ready.clear()
        task = asyncio.create_task(bot.start(TOKEN))
        await asyncio.wait_for(self.fake.ready.wait(), 60)
        await asyncio.wait_for(bot.wait_until_ready(), 60)
        self.env = Env(self.fake, bot, engine, task)
        return self.env

    async def stop(self) -> None:
        if self.env is not None:
            await self.env.bot.close()
            await asyncio.wait_for(self.env.task, 30)
            self.env = None


@pytest.fixture
async def harness(tmp_path, bundled_model, monkeypatch):
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    harness = Harness(fake, tmp_path / "bot.db", bundled_model)
    await harness.start()
    yield harness
    await harness.stop()
    await fake.stop()
    assert fake.unexpected == []
    for record in fake.interactions.values():  # every interaction acknowledged in time
        assert record.ack_seconds is not None and record.ack_seconds < 3.0, record


def final_story_message(fake: FakeDiscord, record) -> dict:
    """The bot's reply to an interaction once it is finished (it carries 👍 and 👎)."""
    return fake.messages[record.original_id]


async def finished(fake: FakeDiscord, record) -> dict:
    await fake.wait_for(
        lambda: record.original_id and fake.reactions_on(record.original_id) == ["👍", "👎"]
    )
    return fake.messages[record.original_id]


async def test_solo_story_start_continue_retry_undo_export(harness):
    fake = harness.fake
    assert {c["name"] for c in fake.commands} == {"story"}
    start = await fake.slash(
        ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a little fox lived in a wood."
    )
    opening = await finished(fake, start)
    assert start.callback_type == 5  # deferred first
    assert opening["content"].startswith("📖 **Once upon a time, a little fox lived in a wood.**")
    assert opening["allowed_mentions"] == {"parse": []}
    custom_ids = [c["custom_id"] for row in opening["components"] for c in row["components"]]
    assert custom_ids == ["tw:continue", "tw:retry"]

    cont = await fake.slash(BEN, TEXT_CHANNEL, "continue", text="The fox found a shiny key.")
    message = await finished(fake, cont)
    assert message["content"].startswith("**Ben:** The fox found a shiny key.")

    retry = await fake.press(ANN, int(message["id"]), "tw:retry")
    retried = await finished(fake, retry)
    assert retried["content"].startswith("🔁")
    alternatives = await harness.env.engine.alternatives(str(TEXT_CHANNEL))
    assert len(alternatives) == 2

    undo = await fake.slash(ANN, TEXT_CHANNEL, "undo")
    await fake.wait_for(
        lambda: (
            undo.original_id and "Undone: 2 turn(s)" in fake.messages[undo.original_id]["content"]
        )
    )

    export = await fake.slash(ANN, TEXT_CHANNEL, "export")
    await fake.wait_for(
        lambda: export.original_id and fake.messages[export.original_id]["attachments"]
    )
    attachment = fake.messages[export.original_id]["attachments"][0]
    assert attachment["filename"] == "story.md"
    assert attachment["content"].startswith("# Once upon a time, a little fox lived in a wood.")
    assert "The fox found a shiny key" not in attachment["content"]  # undone
