"""Hostile input through the real bot: fuzzed slash commands and button presses
(lone surrogates, NUL and control characters, extreme numbers, 100 KB strings, mention
syntax) from several people in several channels, while one channel tells a story as
usual. Nothing may break: no unhandled exception, no raw mention shown, no message over
2,000 characters, every interaction acknowledged within 3 seconds, and the ordinary
channel's every continuation written.

FUZZ_INTERACTIONS sets how many (default 400; the issue's acceptance run used 2,000)."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import re

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.client import StoryBot
from bot.settings import BotSettings
from storyengine.config import Settings
from storyengine.sampling import SamplingParams
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.story.engine import StoryEngine
from tests.helpers.fake_discord import OTHER_CHANNEL, TEXT_CHANNEL, TOKEN, FakeDiscord, FakeUser
from tests.helpers.models import make_tiny_model

pytestmark = pytest.mark.slow

RAW_MENTION = re.compile(r"@everyone|@here|<@!?\d+>|<@&\d+>", re.IGNORECASE)
PEOPLE = [
    FakeUser(301, "Fuzzy"),
    FakeUser(302, "@everyone"),
    FakeUser(303, "<@1>"),
    FakeUser(304, "Mod", moderator=True),
    FakeUser(305, "Boss", admin=True),
]
GOOD = FakeUser(310, "Goodie")
FUZZ_CHANNELS = [TEXT_CHANNEL, 2002, 2003]


def hostile_text(rng: random.Random) -> str:
    pieces = [
        lambda: "\ud800",
        lambda: "\udfff\ud83d",
        lambda: "\x00",
        lambda: "".join(chr(rng.randrange(0, 32)) for _ in range(5)),
        lambda: "@everyone",
        lambda: "@here",
        lambda: f"<@{rng.randrange(10**18)}>",
        lambda: f"<@&{rng.randrange(10**18)}>",
        lambda: "<|endoftext|>",
        lambda: "x" * 100_000,
        lambda: "🦊" * rng.randrange(1, 600),
        lambda: "\u202e\u200b\ufeff",
        lambda: "Once upon a time, a fox found a key.",
        lambda: "",
        lambda: " " * rng.randrange(1, 50),
    ]
    return "".join(rng.choice(pieces)() for _ in range(rng.randrange(1, 4)))


def hostile_number(rng: random.Random) -> float:
    return rng.choice(
        [float("nan"), float("inf"), -float("inf"), 1e308, -1e308, 5e-324, 1e-38, -0.0, 0.0, 0.7]
    )


def hostile_int(rng: random.Random) -> int:
    return rng.choice([2**70, -(2**70), 0, -1, 1, 16, 30, 86400, 10**12, 400])


def fuzz_command(rng: random.Random) -> tuple[str, dict]:
    text = lambda: hostile_text(rng)  # noqa: E731
    choices = [
        ("start", lambda: {"premise": text(), **({"genre": text()} if rng.random() < 0.5 else {})}),
        ("start", lambda: {"premise": text(), "mode": rng.choice(["solo", "round-robin"])}),
        ("continue", lambda: {"text": text()} if rng.random() < 0.8 else {}),
        ("retry", dict),
        ("undo", dict),
        ("stop", dict),
        ("memory", lambda: {"text": text()}),
        ("note", lambda: {"text": text()}),
        ("lore add", lambda: {"name": text(), "triggers": text(), "text": text()}),
        ("lore remove", lambda: {"name": text()}),
        ("lore list", dict),
        (
            "settings",
            lambda: {
                "temperature": hostile_number(rng),
                **({"length": hostile_int(rng)} if rng.random() < 0.5 else {}),
                **({"turn_timeout": hostile_int(rng)} if rng.random() < 0.3 else {}),
            },
        ),
        ("join", dict),
        ("leave", dict),
        ("pass", dict),
        ("turn", dict),
        ("recap", dict),
        ("export", dict),
        ("idea", lambda: {"genre": text()}),
        ("end", dict),
        ("my-data", dict),
    ]
    name, make = rng.choice(choices)
    return name, make()


async def all_acknowledged(fake: FakeDiscord, pending: list, sent: dict[int, str]) -> None:
    try:
        await fake.wait_for(lambda: all(r.acked_at for r in pending), 60)
    except AssertionError:
        missing = [sent.get(r.id, f"button on {r.source_id}") for r in pending if not r.acked_at]
        raise AssertionError(f"never acknowledged: {missing}") from None


class Errors(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


async def test_fuzzed_interactions_break_nothing(tmp_path, monkeypatch):
    count = int(os.environ.get("FUZZ_INTERACTIONS", "400"))
    rng = random.Random(int(os.environ.get("FUZZ_SEED", "0")))
    fake = FakeDiscord()
    for channel in FUZZ_CHANNELS[1:]:
        fake.channels[channel] = fake._text_channel(channel, f"fuzz-{channel}")
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    errors = Errors()
    logging.getLogger().addHandler(errors)
    settings = Settings(
        db_path=tmp_path / "fuzz.db",
        adapter_dir=tmp_path / "adapters",
        device="cpu",
        sampling=SamplingParams(max_new_tokens=12, seed=1),
    )
    engine = StoryEngine(settings, generator=BatchingGenerator(make_tiny_model()))
    bot = StoryBot(
        engine=engine,
        settings=BotSettings(cooldown_s=0.0, edit_interval_s=0.2, train_interval_s=None),
    )
    task = asyncio.create_task(bot.start(TOKEN))
    try:
        await asyncio.wait_for(fake.ready.wait(), 60)
        await asyncio.wait_for(bot.wait_until_ready(), 60)

        async def ordinary_story() -> list:
            """Someone telling a story in another channel the whole time."""
            records = [await fake.slash(GOOD, OTHER_CHANNEL, "start", premise="Once upon a time.")]
            await fake.wait_for(lambda: fake.reactions_on(records[0].original_id or 0), 60)
            while not stop.is_set():
                line = await fake.slash(GOOD, OTHER_CHANNEL, "continue", text="And then?")
                records.append(line)
                await fake.wait_for(
                    lambda line=line: line.original_id and fake.reactions_on(line.original_id),
                    60,
                )
            return records

        stop = asyncio.Event()
        ordinary = asyncio.create_task(ordinary_story())
        pending: list = []
        sent: dict[int, str] = {}
        for i in range(count):
            user = rng.choice(PEOPLE)
            channel = rng.choice(FUZZ_CHANNELS)
            roll = rng.random()
            if roll < 0.08:  # a press on a button of any message, old ones included
                buttons = [
                    (int(m["id"]), c["custom_id"])
                    for m in fake.messages.values()
                    for row in m["components"]
                    for c in row["components"]
                    if "custom_id" in c
                ]
                if buttons:  # (Discord delivers presses only for buttons a message has)
                    message_id, custom = rng.choice(buttons)
                    pending.append(await fake.press(user, message_id, custom))
                    sent[pending[-1].id] = f"button {custom}"
                    continue
            if roll < 0.12:
                sub = rng.choice(["learning", "stats", "adapters"])
                options = {"state": rng.choice(["on", "off"])} if sub == "learning" else {}
                pending.append(await fake.slash(user, channel, sub, group="storyadmin", **options))
                continue
            name, options = fuzz_command(rng)
            pending.append(await fake.slash(user, channel, name, **options))
            sent[pending[-1].id] = f"/story {name} {options!r:.300}"
            if i % 8 == 7:  # let the bot keep up, as a real gateway's rate would
                await all_acknowledged(fake, pending, sent)
        await all_acknowledged(fake, pending, sent)
        # Let what is still being written finish.
        await fake.wait_for(lambda: not any(engine.is_generating(str(c)) for c in FUZZ_CHANNELS))
        stop.set()
        good_records = await asyncio.wait_for(ordinary, 120)
    finally:
        await bot.close()
        await asyncio.wait_for(task, 30)
        logging.getLogger().removeHandler(errors)
        await fake.stop()

    assert fake.unexpected == []
    slow = [
        (sent.get(r.id, "ordinary"), r.ack_seconds)
        for r in fake.interactions.values()
        if not r.ack_seconds or r.ack_seconds >= 3.0
    ]
    assert slow == []
    assert [r.getMessage() for r in errors.records] == []  # no unhandled exception
    contents = [c.body for c in fake.calls if isinstance(c.body, dict)]
    shown = [b.get("content") or (b.get("data") or {}).get("content") or "" for b in contents]
    shown += [m["content"] for m in fake.messages.values()]
    assert [s for s in shown if RAW_MENTION.search(s)] == []
    assert [len(s) for s in shown if len(s) > 2000] == []
    assert not any("Something went wrong" in s for s in shown)
    # The ordinary channel: every continuation written, none failed.
    for record in good_records:
        content = fake.messages[record.original_id]["content"]
        assert not content.startswith("⚠️"), content
    assert len(good_records) >= 2
    acks = sorted(r.ack_seconds for r in fake.interactions.values())
    print(
        f"\nfuzz: {len(fake.interactions)} interactions, ack p95 "
        f"{acks[int(len(acks) * 0.95)] * 1000:.0f} ms, max {acks[-1] * 1000:.0f} ms; "
        f"{len(shown)} texts shown, 0 raw mentions, 0 over 2,000; "
        f"{len(good_records)} continuations in the ordinary channel, none failed"
    )
