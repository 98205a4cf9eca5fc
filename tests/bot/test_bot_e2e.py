"""The real discord.py client, running the real bot, against the fake Discord."""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass
from pathlib import Path

import discord
import pytest
import yarl
from discord.gateway import DiscordWebSocket

from bot.client import StoryBot
from bot.settings import BotSettings
from storyengine.config import Settings
from storyengine.learning.datasets import build_datasets
from storyengine.sampling import SamplingParams
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.story.engine import StoryEngine
from tests.helpers.fake_discord import (
    GUILD_ID,
    OTHER_CHANNEL,
    TEXT_CHANNEL,
    TOKEN,
    FakeDiscord,
    FakeUser,
    Upload,
)

pytestmark = pytest.mark.slow

ANN = FakeUser(101, "Ann")
BEN = FakeUser(102, "Ben")
CAT = FakeUser(103, "Cat")
MOD = FakeUser(104, "Mo", moderator=True)
ADMIN = FakeUser(105, "Ada", admin=True)


@dataclass
class Env:
    fake: FakeDiscord
    bot: StoryBot
    engine: StoryEngine
    task: asyncio.Task[None]


class Harness:
    def __init__(self, fake: FakeDiscord, db: Path, model, make_generator=None) -> None:
        self.fake, self.db, self.model = fake, db, model
        self.make_generator = make_generator or self.in_process

    async def in_process(self) -> BatchingGenerator:
        return BatchingGenerator(self.model)
        self.env: Env | None = None

    async def start(
        self, *, turn_check_s: float = 0.1, engine: dict | None = None, **bot_settings
    ) -> Env:
        """The bot on the fake Discord; `engine`: settings of the engine's to change."""
        settings = Settings(
            db_path=self.db,
            adapter_dir=self.db.parent / "adapters",
            device="cpu",
            sampling=SamplingParams(max_new_tokens=24, seed=3),
            **(engine or {}),
        )
        engine = StoryEngine(settings, generator=await self.make_generator())
        bot = StoryBot(
            engine=engine,
            settings=BotSettings(
                cooldown_s=0.0, edit_interval_s=0.2, turn_check_s=turn_check_s, **bot_settings
            ),
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
    async for harness in _harness(tmp_path, bundled_model, monkeypatch):
        yield harness


@pytest.fixture
async def served_harness(tmp_path, bundled_model, monkeypatch):
    """The bot with its model behind a generation service (`storyengine serve`, in this
    process, over real HTTP), as `STORY_GENERATOR_URL` runs it."""
    from storyengine.serving.remote import connect
    from storyengine.serving.service import CompletionService, serve

    served = BatchingGenerator(bundled_model)
    service = CompletionService(served)
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, "127.0.0.1", 0, ready=port.set_result))
    url = f"http://127.0.0.1:{await port}/v1"

    async def remote():
        settings = Settings(device="cpu", generator_url=url)
        return await asyncio.to_thread(connect, settings)

    async for harness in _harness(tmp_path, bundled_model, monkeypatch, remote):
        yield harness
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    await served.close()


async def _harness(tmp_path, model, monkeypatch, make_generator=None):
    fake = FakeDiscord()
    await fake.start()
    monkeypatch.setattr(discord.http.Route, "BASE", fake.api_base)
    monkeypatch.setattr(DiscordWebSocket, "DEFAULT_GATEWAY", yarl.URL(fake.gateway_url))
    harness = Harness(fake, tmp_path / "bot.db", model, make_generator)
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
    await solo_story(harness)


async def test_a_solo_story_told_through_a_generation_service(served_harness):
    await solo_story(served_harness)
    assert served_harness.env.engine.narrator.local_model is None


async def solo_story(harness) -> None:
    fake = harness.fake
    assert {c["name"] for c in fake.commands} == {"story", "storyadmin"}
    start = await fake.slash(
        ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a little fox lived in a wood."
    )
    opening = await finished(fake, start)
    assert start.callback_type == 5  # deferred first
    assert opening["content"].startswith("📖 **Once upon a time, a little fox lived in a wood.**")
    assert opening["allowed_mentions"] == {"parse": []}
    story = await harness.env.engine.active_story(str(TEXT_CHANNEL))
    custom_ids = [c["custom_id"] for row in opening["components"] for c in row["components"]]
    opening_turn = (await harness.env.engine.view(str(TEXT_CHANNEL))).turns[-1]
    assert custom_ids == [
        f"tw:continue:{story.id}",
        f"tw:retry:{story.id}",
        f"tw:swipe:{story.id}:{opening_turn.position}:prev",
        f"tw:swipe:{story.id}:{opening_turn.position}:next",
    ]

    cont = await fake.slash(BEN, TEXT_CHANNEL, "continue", text="The fox found a shiny key.")
    message = await finished(fake, cont)
    assert message["content"].startswith("**Ben:** The fox found a shiny key.")

    retry = await fake.press(ANN, int(message["id"]), f"tw:retry:{story.id}")
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


def replies_to(fake: FakeDiscord, record) -> list[str]:
    ids = ([record.original_id] if record.original_id else []) + record.followups
    return [fake.messages[i]["content"] for i in ids if i in fake.messages]


async def said(fake: FakeDiscord, record, text: str) -> None:
    await fake.wait_for(lambda: any(text in c for c in replies_to(fake, record)))


def button(message: dict, prefix: str) -> str:
    """The custom id of the message's button that starts with `prefix`."""
    ids = [c["custom_id"] for row in message["components"] for c in row["components"]]
    return next(i for i in ids if i.startswith(prefix))


async def test_an_ended_storys_buttons_do_not_act_on_the_next_story(harness):
    fake, engine = harness.fake, harness.env.engine
    first = await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    await said(fake, await fake.slash(ANN, TEXT_CHANNEL, "end"), "The story has ended")
    await finished(
        fake, await fake.slash(BEN, TEXT_CHANNEL, "start", premise="Once upon a time, an owl.")
    )
    second = await engine.view(str(TEXT_CHANNEL))
    for prefix in ("tw:continue", "tw:retry"):
        press = await fake.press(ANN, int(first["id"]), button(first, prefix))
        await said(fake, press, "That story has ended")
        assert press.ephemeral
    after = await engine.view(str(TEXT_CHANNEL))
    assert after.story.id == second.story.id and after.turns == second.turns

    # A message sent before buttons carried their story acts on the channel's story.
    first["components"][0]["components"][0]["custom_id"] = "tw:continue"
    legacy = await fake.press(ANN, int(first["id"]), "tw:continue")
    await finished(fake, legacy)
    assert len((await engine.view(str(TEXT_CHANNEL))).turns) == len(second.turns) + 1


async def test_swipes_page_the_latest_reply_and_keep_one_preference(harness):
    fake, engine = harness.fake, harness.env.engine
    channel = str(TEXT_CHANNEL)
    await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    reply = await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "continue", text="The fox found a key.")
    )
    for _ in range(2):  # three alternatives in all, each shown in a message of its own
        retry = await fake.press(ANN, int(reply["id"]), button(reply, "tw:retry"))
        reply = await finished(fake, retry)
    alts = [t.generation_id for t in await engine.alternatives(channel)]
    assert len(alts) == 3
    message_id = int(reply["id"])

    async def swipe(prefix: str, expect: str):
        press = await fake.press(ANN, message_id, button(fake.messages[message_id], prefix))
        await said(fake, press, expect)
        return press

    await swipe("tw:swipe", "🔀 2/3")  # ◀ comes first
    shown = fake.messages[message_id]["content"]
    assert "**Ann:** The fox found a key." in shown
    assert (await engine.view(channel)).turns[-1].generation_id == alts[1]
    assert await ann_pairs(engine) == {(alts[1], alts[2])}
    await swipe("tw:swipe", "🔀 1/3")
    assert await ann_pairs(engine) == {(alts[0], alts[1]), (alts[0], alts[2])}
    first = await swipe("tw:swipe", "This is the first one")
    assert first.ephemeral
    await swipe(button(fake.messages[message_id], "tw:swipe").replace("prev", "next"), "🔀 2/3")
    # Changing one's mind replaces the pairs: the one kept over every one seen.
    assert await ann_pairs(engine) == {(alts[1], alts[0]), (alts[1], alts[2])}
    assert await engine.store.generation_for_message(str(message_id)) == alts[1]

    await finished(fake, await fake.slash(ANN, TEXT_CHANNEL, "continue", text="A door opened."))
    late = await fake.press(ANN, message_id, button(fake.messages[message_id], "tw:swipe"))
    await said(fake, late, "Only the storyteller's latest reply can be swiped")
    assert (await engine.view(channel)).turns[-3].generation_id == alts[1]


async def ann_pairs(engine) -> set[tuple[int, int]]:
    pairs = await engine.store.preference_pairs()
    return {(c, r) for c, r, user, _ in pairs if user == str(ANN.id)}


async def test_the_context_viewer_answers_only_the_one_who_asks(harness):
    fake = harness.fake
    await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    await said(fake, await fake.slash(ANN, TEXT_CHANNEL, "memory", text="Rusty is shy."), "Memory")
    await finished(fake, await fake.slash(BEN, TEXT_CHANNEL, "continue", text="Rusty hid."))
    context = await fake.slash(BEN, TEXT_CHANNEL, "context")
    await said(fake, context, "What the storyteller saw for its last reply")
    text = "\n".join(replies_to(fake, context))
    assert "[Memory] " in text and "Rusty is shy." in text and "[Recent turns: " in text
    assert context.ephemeral


async def test_save_then_load_in_another_channel_and_go_on(harness):
    fake, engine = harness.fake, harness.env.engine
    await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    await finished(fake, await fake.slash(BEN, TEXT_CHANNEL, "continue", text="It found a key."))
    save = await fake.slash(ANN, TEXT_CHANNEL, "save")
    await fake.wait_for(lambda: save.original_id and fake.messages[save.original_id]["attachments"])
    attachment = fake.messages[save.original_id]["attachments"][0]
    assert attachment["filename"] == "taleweaver-story.json"
    saved = attachment["data"]

    load = await fake.slash(BEN, OTHER_CHANNEL, "load", file=Upload("story.json", saved))
    await said(fake, load, "3 turns loaded")
    loaded = fake.messages[load.original_id]
    assert "It found a key." not in loaded["content"]  # the last turn is the reply
    story = await engine.active_story(str(OTHER_CHANNEL))
    assert button(loaded, "tw:continue") == f"tw:continue:{story.id}"
    go_on = await fake.press(BEN, load.original_id, button(loaded, "tw:continue"))
    await finished(fake, go_on)
    assert len((await engine.view(str(OTHER_CHANNEL))).turns) == 4

    broken = await fake.slash(BEN, TEXT_CHANNEL, "load", file=Upload("x.json", saved[:40]))
    await said(fake, broken, "not JSON")


async def test_import_a_card_png_and_world_info_then_export_the_lore(harness):
    from tests.story.test_lorebooks import CARD, WORLD_INFO, card_png

    fake, engine = harness.fake, harness.env.engine
    await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    card = await fake.slash(ANN, TEXT_CHANNEL, "import", file=Upload("rusty.png", card_png(CARD)))
    await said(fake, card, "Imported a character card: 2 lore card(s) (Rusty, The river)")
    assert (await engine.active_story(str(TEXT_CHANNEL))).memory.startswith("Shy, curious")
    book = json.dumps(WORLD_INFO).encode()
    world = await fake.slash(ANN, TEXT_CHANNEL, "import", file=Upload("world.json", book))
    await said(fake, world, "Imported a world info: 2 lore card(s)")
    bad = await fake.slash(ANN, TEXT_CHANNEL, "import", file=Upload("x.png", b"\x89PNG\r\n\x1a\n"))
    await said(fake, bad, 'no "chara" text chunk')

    export = await fake.slash(ANN, TEXT_CHANNEL, "lore export")
    await fake.wait_for(
        lambda: export.original_id and fake.messages[export.original_id]["attachments"]
    )
    exported = json.loads(fake.messages[export.original_id]["attachments"][0]["content"])
    names = [e["comment"] for e in exported["entries"].values()]
    assert names == ["Rusty", "The river", "Hoot", "oak"]

    # Where no story runs, a card with a greeting starts one.
    fresh = await fake.slash(BEN, OTHER_CHANNEL, "import", file=Upload("r.png", card_png(CARD)))
    await said(fake, fresh, "Rusty peeks out of his den.")
    opening = fake.messages[fresh.original_id]
    assert "Started a story from a character card" in opening["content"]
    go_on = await fake.press(BEN, fresh.original_id, button(opening, "tw:continue"))
    await finished(fake, go_on)


async def test_illustrate_a_turn_with_the_tiny_pipeline(harness, tmp_path):
    from tests.helpers.pictures import tiny_pipeline

    fake = harness.fake
    await harness.stop()  # again, with pictures on
    pipeline = tiny_pipeline(tmp_path / "pipeline")
    await harness.start(engine={"image_model": str(pipeline), "image_size": 32, "image_steps": 2})
    off_topic = await fake.slash(ANN, TEXT_CHANNEL, "illustrate")
    await said(fake, off_topic, "no story running here")
    await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    await finished(fake, await fake.slash(BEN, TEXT_CHANNEL, "continue", text="Rusty hid."))
    too_far = await fake.slash(ANN, TEXT_CHANNEL, "illustrate", turn=9)
    await said(fake, too_far, "pick a turn from 1 to 3")
    assert too_far.ephemeral  # refused before any "drawing..." reply

    drawn = await fake.slash(ANN, TEXT_CHANNEL, "illustrate", turn=2)
    await fake.wait_for(
        lambda: drawn.original_id and fake.messages[drawn.original_id]["attachments"], 60
    )
    message = fake.messages[drawn.original_id]
    picture = message["attachments"][0]
    assert picture["filename"] == "turn-2.png"
    assert picture["data"].startswith(b"\x89PNG")
    assert message["content"].startswith("🎨 Turn 2 of 3\n-# Rusty hid.")
    assert message["allowed_mentions"] == {"parse": []}


async def test_illustrate_says_how_to_turn_pictures_on(harness):
    fake = harness.fake
    await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    off = await fake.slash(ANN, TEXT_CHANNEL, "illustrate")
    await said(fake, off, "STORY_IMAGE_MODEL")
    assert off.ephemeral
    privacy = await fake.slash(CAT, TEXT_CHANNEL, "help", topic="privacy")
    await said(fake, privacy, "What Taleweaver stores, and why")


def labelled(message: dict, label: str) -> str:
    """The custom id of the message's button labelled `label`."""
    return next(
        c["custom_id"]
        for row in message["components"]
        for c in row["components"]
        if c.get("label") == label
    )


async def test_the_storyteller_drafts_a_character_and_keep_makes_it_lore(harness):
    fake, engine = harness.fake, harness.env.engine
    await finished(
        fake, await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a fox.")
    )
    draft = await fake.slash(ANN, TEXT_CHANNEL, "lore character", name="Rusty", hint="shy")
    await said(fake, draft, "🧑 **Rusty**")
    message = fake.messages[draft.original_id]
    assert "Rusty looked" in message["content"] and await engine.lore(str(TEXT_CHANNEL)) == []
    intruder = await fake.press(BEN, draft.original_id, labelled(message, "Keep"))
    await said(fake, intruder, "Only whoever asked for this card can keep it")
    again = await fake.press(ANN, draft.original_id, labelled(message, "Again"))
    await fake.wait_for(lambda: again.acked_at)
    keep = await fake.press(ANN, draft.original_id, labelled(message, "Keep"))
    await fake.wait_for(lambda: "Kept: lore card **Rusty**" in message["content"])
    assert keep.callback_type == 7 and message["components"] == []
    cards = await engine.lore(str(TEXT_CHANNEL))
    assert [(c.name, c.triggers) for c in cards] == [("Rusty", ("Rusty",))]
    assert cards[0].text in message["content"]


class Clock:
    def __init__(self) -> None:
        self.now = 1_000_000.0

    def __call__(self) -> float:
        return self.now


async def test_round_robin_game_with_timeout_and_restart(harness):
    fake = harness.fake
    clock = Clock()
    harness.env.engine.clock = clock
    start = await fake.slash(
        ANN,
        TEXT_CHANNEL,
        "start",
        premise="Once upon a time, three friends found a map.",
        mode="round-robin",
    )
    await finished(fake, start)
    await said(fake, start, "It is **Ann**'s turn")
    for user in (BEN, CAT):
        join = await fake.slash(user, TEXT_CHANNEL, "join")
        await said(fake, join, f"{user.name} joins")

    # Out of turn: refused politely, only to Ben, before any work.
    early = await fake.slash(BEN, TEXT_CHANNEL, "continue", text="Ben grabs the map.")
    await said(fake, early, "It is Ann's turn")
    assert early.ephemeral and early.callback_type == 4

    line = await fake.slash(ANN, TEXT_CHANNEL, "continue", text="Ann unfolds the map.")
    await finished(fake, line)
    await said(fake, line, "It is **Ben**'s turn")

    # Ben lets the time run out: the turn passes to Cat, and the channel is told.
    before = len(fake.bot_messages(TEXT_CHANNEL))
    clock.now += 601
    await fake.wait_for(
        lambda: any("Time is up" in m["content"] for m in fake.bot_messages(TEXT_CHANNEL)[before:])
    )
    notice = next(
        m for m in fake.bot_messages(TEXT_CHANNEL)[before:] if "Time is up" in m["content"]
    )
    assert "It is **Cat**'s turn" in notice["content"]

    # The bot restarts in the middle of the game: the game and its deadline resume.
    await harness.stop()
    env = await harness.start()
    env.engine.clock = clock
    turn = await fake.slash(ANN, TEXT_CHANNEL, "turn")
    await said(fake, turn, "It is **Cat**'s turn")
    assert "Order: Ann, Ben, Cat" in replies_to(fake, turn)[0]
    clock.now += 601  # Cat's deadline was stored: it passes after the restart too
    await fake.wait_for(
        lambda: any(
            "It is **Ann**'s turn" in m["content"] and "Time is up" in m["content"]
            for m in fake.bot_messages(TEXT_CHANNEL)
        )
    )
    skip = await fake.slash(MOD, TEXT_CHANNEL, "pass")  # a moderator skips Ann
    await said(fake, skip, "It is **Ben**'s turn")
    refused = await fake.slash(CAT, TEXT_CHANNEL, "pass")
    await said(fake, refused, "only they or a moderator")
    assert refused.ephemeral


async def test_companion_session_in_a_thread_records_the_choice(harness):
    fake = harness.fake
    start = await fake.slash(
        ANN,
        TEXT_CHANNEL,
        "start",
        premise="Once upon a time, a girl and a dragon met.",
        mode="companion",
    )
    await said(fake, start, "continues in <#")
    thread_id = next(i for i, c in fake.channels.items() if c.get("type") == 11)
    await fake.wait_for(lambda: len(fake.bot_messages(thread_id)) >= 2)
    opening = fake.bot_messages(thread_id)[0]
    assert opening["content"].startswith("📖 **Once upon a time, a girl and a dragon met.**")

    offer = await fake.slash(ANN, thread_id, "continue", text="The girl asks the dragon its name.")
    await said(fake, offer, "Choose how the story goes on")
    message = fake.messages[offer.original_id]
    buttons = [c["custom_id"] for row in message["components"] for c in row["components"]]
    assert len(buttons) == 3 and all(b.startswith("tw:choice:") for b in buttons)

    intruder = await fake.press(BEN, offer.original_id, buttons[1])
    await said(fake, intruder, "only they (or a moderator) can choose a continuation")
    assert intruder.ephemeral
    choose = await fake.press(ANN, offer.original_id, buttons[1])
    await fake.wait_for(lambda: fake.reactions_on(offer.original_id) == ["👍", "👎"])
    assert choose.callback_type == 7 and message["components"] == []
    pairs = await harness.env.engine.store.preference_pairs()
    assert len(pairs) == 2 and {p[2:] for p in pairs} == {("101", "choice")}
    view = await harness.env.engine.view(str(thread_id))
    assert view.turns[-1].generation_id == pairs[0][0]  # the chosen one joined the story
    assert view.turns[-1].text in message["content"]


async def test_reactions_are_recorded_exactly(harness):
    fake = harness.fake
    engine = harness.env.engine
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a cat sang.")
    message = await finished(fake, start)
    message_id = int(message["id"])
    generation = await engine.store.generation_for_message(str(message_id))

    await fake.react(ANN, message_id, "👍")
    await fake.react(BEN, message_id, "👎")
    await fake.react(BEN, message_id, "❤️")
    await fake.react(CAT, message_id, "🎉")
    await fake.react(FakeUser(555, "OtherBot"), message_id, "👍", bot=True)  # bots are ignored
    await fake.react(ANN, 424242, "👍")  # not a story message: ignored

    expected = sorted(
        [("101", "👍", 1.0), ("102", "👎", -1.0), ("102", "❤️", 1.0), ("103", "🎉", 0.0)]
    )
    await _settle(engine, generation, expected)
    await fake.react(BEN, message_id, "👎", add=False)
    await _settle(
        engine, generation, sorted([("101", "👍", 1.0), ("102", "❤️", 1.0), ("103", "🎉", 0.0)])
    )
    all_rows = await engine.store.db.execute_fetchall("SELECT COUNT(*) FROM feedback")
    assert all_rows[0][0] == 3


async def _settle(engine, generation, expected, seconds: float = 10.0) -> None:
    async with asyncio.timeout(seconds):
        while sorted(await engine.store.feedback(generation)) != expected:  # noqa: ASYNC110
            await asyncio.sleep(0.02)


async def test_long_output_is_split_and_mentions_are_disabled(harness, monkeypatch):
    fake = harness.fake
    # The storyteller writes all 400 tokens (no early end), so the reply passes 2,000 characters.
    monkeypatch.setattr("storyengine.story.narrator.MIN_NEW_TOKENS", 400)
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a bird flew.")
    await finished(fake, start)
    settings = await fake.slash(ANN, TEXT_CHANNEL, "settings", length=400)
    await said(fake, settings, "length 400 tokens")
    long_line = ("@everyone look! <@123> The bird sang a very long song about the sea. " * 14)[
        :1000
    ]

    # Meanwhile, another channel's command is answered at once.
    cont = await fake.slash(BEN, TEXT_CHANNEL, "continue", text=long_line)
    await fake.wait_for(lambda: cont.acked_at)
    help_ = await fake.slash(CAT, 2001, "help")
    await said(fake, help_, "Taleweaver")
    assert help_.ack_seconds < 3.0

    await fake.wait_for(lambda: cont.original_id and fake.reactions_on(cont.original_id), 120)
    # Every part gets its reactions, one message after another: wait for the last one.
    await fake.wait_for(lambda: all(fake.reactions_on(i) == ["👍", "👎"] for i in cont.followups))
    parts = [fake.messages[cont.original_id]] + [fake.messages[i] for i in cont.followups]
    text = "\n\n".join(p["content"] for p in parts)
    assert len(text) > 2000 and len(parts) >= 2
    assert all(len(p["content"]) <= 2000 for p in parts)
    assert "@everyone" not in text and "<@123>" not in text
    for part in parts:
        assert fake.reactions_on(int(part["id"])) == ["👍", "👎"]
    for m in fake.messages.values():
        if m["content"]:
            assert m["allowed_mentions"] == {"parse": []}, m


async def test_stop_ends_a_generation_and_says_so(harness, monkeypatch):
    fake = harness.fake
    monkeypatch.setattr("storyengine.story.narrator.MIN_NEW_TOKENS", 400)
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a frog hopped.")
    await finished(fake, start)
    await said(fake, await fake.slash(ANN, TEXT_CHANNEL, "settings", length=400), "length 400")
    cont = await fake.slash(BEN, TEXT_CHANNEL, "continue", text="The frog met a duck.")
    await fake.wait_for(lambda: harness.env.engine.is_generating(str(TEXT_CHANNEL)))
    stop = await fake.slash(CAT, TEXT_CHANNEL, "stop")
    await said(fake, stop, "Stopped.")
    # The message keeps what was written and says it was stopped; no buttons on it.
    await said(fake, cont, "⏹️ The storyteller was stopped before finishing.")
    stopped = fake.messages[cont.original_id]
    assert stopped["content"].startswith("**Ben:** The frog met a duck.")
    assert stopped["components"] == []
    rows = await harness.env.engine.store.db.execute_fetchall(
        "SELECT finish_reason FROM generations ORDER BY id DESC LIMIT 1"
    )
    assert rows[0][0] == "cancelled"
    assert [t.text for t in (await harness.env.engine.view(str(TEXT_CHANNEL))).turns][-1] == (
        "The frog met a duck."  # the line is kept
    )


async def test_storyadmin_learning_stats_adapters_train_and_rollback(harness):
    fake, engine = harness.fake, harness.env.engine
    admin_command = next(c for c in fake.commands if c["name"] == "storyadmin")
    assert int(admin_command["default_member_permissions"]) == 1 << 5  # Manage Server
    assert admin_command["contexts"] == [0]  # servers only, never in DMs

    refused = await fake.slash(ANN, TEXT_CHANNEL, "stats", group="storyadmin")
    await said(fake, refused, "Manage Server")
    assert refused.ephemeral

    # Learning is off until an admin switches it on; stories know their server.
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a frog sang.")
    await finished(fake, start)
    story = await engine.active_story(str(TEXT_CHANNEL))
    assert story.community == str(GUILD_ID)
    status = await fake.slash(ADMIN, TEXT_CHANNEL, "learning", group="storyadmin")
    await said(fake, status, "Learning is **off** here")
    on = await fake.slash(ADMIN, TEXT_CHANNEL, "learning", group="storyadmin", state="on")
    await said(fake, on, "Learning is **on** here")
    assert on.ephemeral and await engine.learning_enabled(str(GUILD_ID))

    message_id = int(fake.messages[start.original_id]["id"])
    generation = await engine.store.generation_for_message(str(message_id))
    await fake.react(BEN, message_id, "👍")
    await _settle(engine, generation, [("102", "👍", 1.0)])
    stats = await fake.slash(ADMIN, TEXT_CHANNEL, "stats", group="storyadmin")
    await said(fake, stats, "approval")
    text = replies_to(fake, stats)[0]
    assert "**Learning** on · **serving** the base model" in text
    assert (
        "**New feedback** since this server's last round: 1; since the shared adapter's"
        " (all learning servers): 1"
    ) in text
    # one continuation shown, one with a reaction, 1 👍, 0 👎: 100 % approval (in words
    # beside the chart, for screen readers)
    assert (
        "• base model: approval 100% (1 liked, 0 disliked); 1 continuations shown, 1 with reactions"
    ) in text

    adapters = await fake.slash(ADMIN, TEXT_CHANNEL, "adapters", group="storyadmin")
    await said(fake, adapters, "This server has no adapter of its own yet")
    shared = await fake.slash(ADMIN, TEXT_CHANNEL, "adapters", group="storyadmin", adapter="shared")
    await said(fake, shared, "No shared adapter trained yet")
    rollback = await fake.slash(ADMIN, TEXT_CHANNEL, "rollback", group="storyadmin")
    await said(fake, rollback, "No adapter of this server's own is promoted")
    rollback = await fake.slash(
        ADMIN, TEXT_CHANNEL, "rollback", group="storyadmin", adapter="shared"
    )
    await said(fake, rollback, "base model is already being served")

    # A real round in a child process, of this server's own adapter by default: one
    # reaction is not enough to train on.
    train = await fake.slash(ADMIN, TEXT_CHANNEL, "train", group="storyadmin")
    await said(fake, train, "Training round finished: skipped: not enough feedback yet")
    assert train.ephemeral
    assert harness.env.bot.training.job.community == str(GUILD_ID)
    runs = await engine.store.db.execute_fetchall("SELECT status FROM training_runs")
    assert [r[0] for r in runs] == ["done"]


async def test_a_shutdown_lets_a_running_command_finish_its_reply(harness, monkeypatch):
    """Found by the fuzz test: `/storyadmin stats` was still drawing when the bot closed,
    and its reply met a closed HTTP session ("command failed", an unretrieved task
    exception). A shutdown now waits for running commands as for stories."""
    learning = harness.env.engine.learning
    entered, release = asyncio.Event(), asyncio.Event()
    real = learning.summary

    async def slow_summary(community):
        entered.set()
        await release.wait()
        return await real(community)

    monkeypatch.setattr(learning, "summary", slow_summary)
    fake = harness.fake
    stats = await fake.slash(ADMIN, TEXT_CHANNEL, "stats", group="storyadmin")
    await asyncio.wait_for(entered.wait(), 30)
    closing = asyncio.ensure_future(harness.env.bot.close())
    await fake.wait_for(lambda: harness.env.bot.work.waiting == 1)  # close waits for it
    assert not closing.done()
    release.set()
    await asyncio.wait_for(closing, 30)
    assert "**Learning** off" in replies_to(fake, stats)[0]


async def test_training_the_shared_adapter_can_be_kept_to_the_owners_servers(harness):
    await harness.stop()
    await harness.start(admin_guild_ids=frozenset({GUILD_ID + 1}))
    fake = harness.fake
    for command in ("train", "rollback"):
        refused = await fake.slash(
            ADMIN, TEXT_CHANNEL, command, group="storyadmin", adapter="shared"
        )
        await said(fake, refused, "only the bot owner's servers can train or roll it back")
    learning = await fake.slash(ADMIN, TEXT_CHANNEL, "learning", group="storyadmin", state="on")
    await said(fake, learning, "Learning is **on** here")  # a server's own switch
    assert harness.env.bot.training.job is None
    # This server's own adapter is its own to train.
    own = await fake.slash(ADMIN, TEXT_CHANNEL, "train", group="storyadmin")
    await said(fake, own, "Training round finished")
    assert harness.env.bot.training.job.community == str(GUILD_ID)


async def test_a_round_starts_by_itself_once_enough_feedback_came_in(harness):
    await harness.stop()
    env = await harness.start(train_min_new_feedback=1, train_interval_s=60.0, train_check_s=0.1)
    fake = harness.fake
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a bee hummed.")
    message = await finished(fake, start)
    await fake.react(BEN, int(message["id"]), "👍")
    await fake.wait_for(lambda: env.engine.reactions.recorded == 1)
    checked = env.bot.training.checks
    await fake.wait_for(lambda: env.bot.training.checks >= checked + 2)
    assert env.bot.training.job is None  # learning is off in this server: nothing counts
    on = await fake.slash(ADMIN, TEXT_CHANNEL, "learning", group="storyadmin", state="on")
    await said(fake, on, "Learning is **on** here")
    # Two lineages are due, each with its own clock: the shared adapter's, then this
    # server's own.
    await fake.wait_for(lambda: env.bot.training.job is not None)
    shared = await asyncio.wait_for(env.bot.training.wait(), 120)
    assert shared.reason == "1 new reactions and choices" and shared.community is None
    assert shared.outcome.startswith("skipped: not enough feedback yet")
    await fake.wait_for(lambda: env.bot.training.job is not shared)
    own = await asyncio.wait_for(env.bot.training.wait(), 120)
    assert own.reason == f"1 new reactions and choices in community {GUILD_ID}"
    assert own.community == str(GUILD_ID)
    assert own.outcome.startswith("skipped: not enough feedback yet")
    checked = env.bot.training.checks  # neither interval has passed: no third round
    await fake.wait_for(lambda: env.bot.training.checks >= checked + 2)
    assert env.bot.training.job is own


async def test_companion_in_a_dm_then_my_data_and_forget_me(harness):
    """A private session: never trainable; the person downloads their data, then has
    it forgotten, through the same commands as in a server."""
    fake, engine = harness.fake, harness.env.engine
    dm = fake.dm_channel(ANN)
    start = await fake.slash(
        ANN, dm, "start", premise="Once upon a time, a boy met a whale.", mode="companion"
    )
    await finished(fake, start)
    story = await engine.active_story(str(dm))
    assert story.mode == "companion" and story.community == "dm"
    offer = await fake.slash(ANN, dm, "continue", text="The boy waves at the whale.")
    await said(fake, offer, "Choose how the story goes on")
    buttons = [
        c["custom_id"]
        for row in fake.messages[offer.original_id]["components"]
        for c in row["components"]
    ]
    await fake.press(ANN, offer.original_id, buttons[0])
    await fake.wait_for(lambda: fake.reactions_on(offer.original_id) == ["👍", "👎"])
    assert len(await engine.store.preference_pairs()) == 2
    data = await build_datasets(engine.store)
    assert data.pairs == [] and data.examples == []  # a DM is never trained on

    mine = await fake.slash(ANN, dm, "my-data")
    await fake.wait_for(lambda: mine.original_id)
    attachment = fake.messages[mine.original_id]["attachments"][0]
    assert attachment["filename"] == "my-taleweaver-data.json"
    exported = json.loads(attachment["content"])
    assert exported["user_id"] == str(ANN.id)
    assert "The boy waves at the whale." in [t["text"] for t in exported["turns"]]

    forget = await fake.slash(ANN, dm, "forget-me")
    await said(fake, forget, "It cannot be undone. Go ahead?")
    confirm = fake.messages[forget.original_id]
    yes = confirm["components"][0]["components"][0]
    assert yes["label"] == "Yes, forget me"
    await fake.press(ANN, forget.original_id, yes["custom_id"])
    await fake.wait_for(lambda: confirm["content"].startswith("Done:"))
    assert "2 choice(s) deleted" in confirm["content"] and confirm["components"] == []
    assert await engine.store.is_forgotten(str(ANN.id))
    assert await engine.store.preference_pairs() == []
    after = await engine.export_user_data(str(ANN.id))
    assert after["reactions"] == [] and after["preferences"] == []
    assert {t["author_name"] for t in after["turns"]} == {"a former player"}


async def test_a_burst_of_reactions_loses_nothing_and_starves_no_command(harness):
    """5,000 raw reaction events (50 people, bots, duplicates, removals, messages that are
    not stories, custom emoji), then a command that is answered without deferring: it is
    acknowledged within Discord's 3 seconds, and every vote lands exactly once."""
    import random

    fake, engine = harness.fake, harness.env.engine
    start = await fake.slash(ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a cat sang.")
    message_id = int((await finished(fake, start))["id"])
    generation = await engine.store.generation_for_message(str(message_id))
    rng = random.Random(5)
    expected: dict[tuple[str, str], float] = {}
    values = {"👍": 1.0, "👎": -1.0, "❤️": 1.0, "🎉": 0.0, "<:owl:123>": 0.0}
    for _ in range(5000):
        person = FakeUser(1000 + rng.randrange(50), "Someone")
        emoji = rng.choice(list(values))
        target = rng.choice([message_id, message_id, 424242])
        add, bot = rng.random() < 0.7, person.id >= 1045  # five of the fifty are bots
        await fake.react(person, target, emoji, add=add, bot=bot)
        if target == message_id and not bot:
            if add:
                expected[(str(person.id), emoji)] = values[emoji]
            else:
                expected.pop((str(person.id), emoji), None)
    note = await fake.slash(BEN, TEXT_CHANNEL, "note", text="The mood turns spooky.")
    await said(fake, note, "Author's note set")
    assert note.ack_seconds < 3.0, note.ack_seconds
    await _settle(engine, generation, sorted((u, e, v) for (u, e), v in expected.items()), 60)


async def test_who_may_do_what_through_commands_and_buttons(harness):
    """The permission table, as Discord users meet it: refusals are private and change
    nothing; moderators (Manage Messages) may step in."""
    fake, engine = harness.fake, harness.env.engine
    # A round-robin game: Ann starts it, Ben joins, Cat only watches.
    start = await fake.slash(
        ANN, TEXT_CHANNEL, "start", premise="Once upon a time, two friends.", mode="round-robin"
    )
    opening = await finished(fake, start)
    await said(fake, await fake.slash(BEN, TEXT_CHANNEL, "join"), "Ben joins")
    story_before = await engine.active_story(str(TEXT_CHANNEL))
    watcher_refused = {
        "retry": {},
        "undo": {},
        "memory": {"text": "Cat rules."},
        "note": {"text": "Cat rules."},
        "lore add": {"name": "Cat", "triggers": "cat", "text": "The ruler."},
        "settings": {"temperature": 1.5},
        "end": {},
    }
    for sub, options in watcher_refused.items():
        refused = await fake.slash(CAT, TEXT_CHANNEL, sub, **options)
        await said(fake, refused, "can ")
        assert refused.ephemeral, sub
    press = await fake.press(CAT, int(opening["id"]), button(opening, "tw:retry"))
    await said(fake, press, "Only this game's players")
    assert press.ephemeral
    for sub, options in [("settings", {"temperature": 1.5}), ("end", {})]:
        refused = await fake.slash(BEN, TEXT_CHANNEL, sub, **options)  # a player, not the starter
        await said(fake, refused, "Only whoever started this game, or a moderator")
    memory = await fake.slash(BEN, TEXT_CHANNEL, "memory", text="The friends share a map.")
    await said(fake, memory, "Memory set")
    story = await engine.active_story(str(TEXT_CHANNEL))
    assert story.memory == "The friends share a map." and story.authors_note == ""
    assert (await engine.sampling_for(str(TEXT_CHANNEL))).temperature == 0.85
    assert await engine.lore(str(TEXT_CHANNEL)) == [] and story.status == story_before.status
    await said(fake, await fake.slash(MOD, TEXT_CHANNEL, "settings", temperature=0.5), "0.5")
    await said(fake, await fake.slash(ANN, TEXT_CHANNEL, "end"), "The story has ended")

    # A companion session: only Ann (and a moderator) may touch it.
    companion = await fake.slash(
        ANN, TEXT_CHANNEL, "start", premise="Once upon a time, a girl.", mode="companion"
    )
    await said(fake, companion, "continues in <#")
    thread = next(i for i, c in fake.channels.items() if c.get("type") == 11)
    await fake.wait_for(lambda: len(fake.bot_messages(thread)) >= 2)
    for sub, options in [("continue", {"text": "Ben takes over."}), ("retry", {}), ("undo", {}),
                         ("note", {"text": "x"}), ("end", {})]:  # fmt: skip
        refused = await fake.slash(BEN, thread, sub, **options)
        await said(fake, refused, "companion story for one person")
        assert refused.ephemeral, sub
    await said(fake, await fake.slash(MOD, thread, "note", text="Gently."), "Author's note set")
    assert len((await engine.view(str(thread))).turns) == 1  # only the opening
