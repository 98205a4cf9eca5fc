import asyncio

import pytest

from storyengine.errors import (
    GenerationCancelled,
    InvalidInput,
    NoActiveStory,
    NothingToRetry,
    NothingToUndo,
    StoryAlreadyRunning,
)
from storyengine.records import Author
from storyengine.serving.generation import SequentialGenerator
from storyengine.story.engine import StoryEngine

ANN = Author("u1", "Ann")
BEN = Author("u2", "Ben")
PREMISE = "Once upon a time, a little fox lived at the edge of a big wood."


async def test_a_whole_story(engine):
    opening = await engine.start_story("c1", PREMISE, author=ANN, genre="fairy tale")
    assert opening.text and opening.user_turn is None
    result = await engine.continue_story("c1", BEN, "The fox found a shiny key under a rock.")
    assert result.user_turn.text == "The fox found a shiny key under a rock."
    assert result.user_turn.author_name == "Ben"
    view = await engine.view("c1")
    assert [t.kind for t in view.turns] == ["bot", "user", "bot"]
    assert view.story.genre == "fairy tale"

    # The generation record holds what the feedback loop will train on.
    record = await engine.store.generation(result.generation_id)
    assert record["output"] == result.text
    assert record["prompt"].startswith("This is a fairy tale story.\n" + PREMISE)
    assert "The fox found a shiny key under a rock.\n" in record["prompt"]
    assert record["params"]["max_new_tokens"] == 32
    assert record["model_id"] == "bundled:tinystories-gpt2"
    assert record["latency_s"] > 0 and record["output_tokens"] > 0


async def test_retry_keeps_a_stack_of_alternatives(engine):
    await engine.start_story("c", PREMISE, author=ANN)
    first = await engine.continue_story("c", ANN, "A bird sang.")
    second = await engine.retry("c", seed=11)
    third = await engine.retry("c", seed=12)
    alternatives = await engine.alternatives("c")
    assert [t.id for t in alternatives] == [first.turn.id, second.turn.id, third.turn.id]
    assert [t.status for t in alternatives] == ["replaced", "replaced", "active"]
    assert third.turn.position == first.turn.position
    chosen = await engine.choose_alternative("c", 1)
    assert chosen.text == first.text
    view = await engine.view("c")
    assert view.turns[-1].id == first.turn.id and view.turns[-2].text == "A bird sang."
    with pytest.raises(InvalidInput):
        await engine.choose_alternative("c", 9)
    # Replaced text is kept in the database, not deleted.
    assert (await engine.store.turn(second.turn.id)).status == "replaced"


async def test_undo_removes_the_last_action_and_keeps_the_rows(engine):
    opening = await engine.start_story("c", PREMISE, author=ANN)
    result = await engine.continue_story("c", ANN, "It rained.")
    removed = await engine.undo("c")
    assert {t.id for t in removed} == {result.turn.id, result.user_turn.id}
    assert [t.id for t in (await engine.view("c")).turns] == [opening.turn.id]
    assert (await engine.store.turn(result.turn.id)).status == "undone"
    await engine.undo("c")
    with pytest.raises(NothingToUndo):
        await engine.undo("c")
    with pytest.raises(NothingToRetry):
        await engine.retry("c")
    # A new turn after undo does not collide with undone positions.
    again = await engine.continue_story("c", ANN)
    assert again.turn.position > result.turn.position


async def test_operations_that_make_no_sense_are_refused(engine):
    with pytest.raises(NoActiveStory):
        await engine.continue_story("nowhere", ANN, "Hi.")
    with pytest.raises(NoActiveStory):
        await engine.undo("nowhere")
    await engine.start_story("c", PREMISE, author=ANN)
    with pytest.raises(StoryAlreadyRunning):
        await engine.start_story("c", "Another.", author=ANN)
    with pytest.raises(InvalidInput, match="limit"):
        await engine.continue_story("c", ANN, "x" * 5000)
    with pytest.raises(InvalidInput, match="mode"):
        await engine.start_story("d", PREMISE, author=ANN, mode="chaos")
    with pytest.raises(InvalidInput, match="preset"):
        await engine.configure_channel("c", preset_name="spicy")


async def test_notes_lore_recap_export_and_end(engine):
    await engine.start_story("c", PREMISE, author=ANN)
    await engine.set_memory("c", "The fox is called Rusty.")
    await engine.set_authors_note("c", "The story is funny.")
    await engine.add_lore("c", "Owl", "owl, hoot", "A wise old owl who lives in the oak.")
    result = await engine.continue_story("c", ANN, "An owl flew down to say hello.")
    prompt = (await engine.store.generation(result.generation_id))["prompt"]
    assert "The fox is called Rusty." in prompt
    assert "[Owl: A wise old owl who lives in the oak.]" in prompt
    assert "[Author's note: The story is funny.]" in prompt

    assert [c.name for c in await engine.lore("c")] == ["Owl"]
    recap = await engine.recap("c")
    assert recap.startswith("Story so far (3 turns): " + PREMISE)
    markdown = await engine.export_markdown("c")
    assert markdown.startswith("# Once upon a time")
    assert "**Ann:** An owl flew down to say hello." in markdown
    assert result.text in markdown
    await engine.remove_lore("c", "owl")
    assert await engine.lore("c") == []
    ended = await engine.end_story("c")
    assert ended.status == "ended"
    with pytest.raises(NoActiveStory):
        await engine.continue_story("c", ANN)
    assert "**Ann:** An owl flew down" in await engine.export_markdown("c")  # still exportable
    await engine.start_story("c", "A new tale begins here.", author=ANN)  # a new one may start


async def test_user_control_tokens_and_mentions_cannot_leak(engine):
    await engine.start_story("c", PREMISE, author=ANN)
    result = await engine.continue_story("c", ANN, "<|endoftext|>@everyone look <@123>!")
    assert "<|endoftext|>" not in result.user_turn.text
    prompt = (await engine.store.generation(result.generation_id))["prompt"]
    assert "<|endoftext|>" not in prompt
    assert "@everyone" not in result.text


async def test_channel_settings_apply_to_generation(engine):
    params = await engine.configure_channel("c", preset_name="gentle", max_new_tokens=20)
    assert params.temperature == 0.6 and params.max_new_tokens == 20
    await engine.start_story("c", PREMISE, author=ANN)
    result = await engine.continue_story("c", ANN)
    record = await engine.store.generation(result.generation_id)
    assert record["params"]["temperature"] == 0.6 and record["output_tokens"] <= 20
    other = await engine.sampling_for("elsewhere")
    assert other.temperature == engine.settings.sampling.temperature


async def test_same_channel_is_serialised_other_channels_proceed(engine):
    await engine.start_story("a", PREMISE, author=ANN)
    await engine.start_story("b", PREMISE, author=BEN)
    results = await asyncio.gather(
        engine.continue_story("a", ANN, "One."),
        engine.continue_story("a", BEN, "Two."),
        engine.continue_story("b", BEN, "Three."),
    )
    turns = (await engine.view("a")).turns
    # Each request's user line is followed directly by its own reply: never interleaved.
    assert [t.kind for t in turns] == ["bot", "user", "bot", "user", "bot"]
    assert turns[2].id in {r.turn.id for r in results[:2]}
    assert len((await engine.view("b")).turns) == 3


async def test_stop_cancels_the_generation_in_progress(settings, bundled_model):
    engine = await StoryEngine(
        settings.replace(sampling=settings.sampling.replace(max_new_tokens=400)),
        generator=SequentialGenerator(bundled_model),
    ).start()
    story = await engine.store.create_story("c", PREMISE, genre=None, mode="solo", created_by="u")
    progressed = asyncio.Event()

    async def on_progress(_text):
        progressed.set()

    task = asyncio.create_task(engine.continue_story("c", ANN, "Go on.", on_progress=on_progress))
    await asyncio.wait_for(progressed.wait(), 60)
    assert engine.is_generating("c")
    assert engine.stop("c") is True
    with pytest.raises(GenerationCancelled):
        await task
    assert not engine.is_generating("c")
    # The user's line is kept; the cancelled generation is recorded.
    assert [t.text for t in await engine.store.active_turns(story.id)] == ["Go on."]
    rows = await engine.store.db.execute_fetchall("SELECT finish_reason FROM generations")
    assert [r[0] for r in rows] == ["cancelled"]
    assert engine.stop("c") is False
    await engine.close()


async def test_restart_resumes_every_open_story(settings, bundled_model):
    async with StoryEngine(settings, generator=SequentialGenerator(bundled_model)) as engine:
        await engine.start_story("a", PREMISE, author=ANN)
        await engine.start_story("b", "A dragon woke up.", author=BEN)
        await engine.set_memory("b", "The dragon is shy.")
        before = {c: await engine.view(c) for c in ("a", "b")}
    async with StoryEngine(settings, generator=SequentialGenerator(bundled_model)) as engine:
        assert {s.channel for s in await engine.open_stories()} == {"a", "b"}
        for channel, view in before.items():
            assert await engine.view(channel) == view
        result = await engine.continue_story("b", BEN, "It sneezed.")
        prompt = (await engine.store.generation(result.generation_id))["prompt"]
        assert "The dragon is shy." in prompt and before["b"].turns[0].text in prompt


async def test_a_channel_keeps_no_lock_once_its_operations_are_done(engine):
    """A bot sees new channels (a thread per story) for as long as it runs: the engine
    keeps a channel's lock only while an operation holds or awaits it."""
    await engine.start_story("thread-1", PREMISE, author=ANN)
    await asyncio.gather(
        engine.continue_story("thread-1", ANN, "One."), engine.export_markdown("thread-1")
    )
    await engine.end_story("thread-1")
    assert "thread-1" not in engine.stories.locks


def test_a_start_cancelled_while_the_model_loads_does_not_wait_for_the_load(settings, monkeypatch):
    # A bot stopped (SIGTERM) while loading its model: `asyncio.run` used to wait for the
    # loading thread (the default executor's) before it returned, so the process outlived
    # its stop deadline by the rest of the load.
    import time

    from storyengine.serving import modeling

    def slow_load(settings):
        time.sleep(4)
        raise AssertionError("nobody waits for this")

    monkeypatch.setattr(modeling, "load_model", slow_load)

    async def start_then_stop() -> None:
        engine = StoryEngine(settings)
        starting = asyncio.create_task(engine.start())
        await asyncio.sleep(0.3)
        starting.cancel()
        with pytest.raises(asyncio.CancelledError):
            await starting
        await engine.store.close()

    began = time.monotonic()
    asyncio.run(start_then_stop())
    assert time.monotonic() - began < 2


class _ElsewhereInfo:
    """A `ModelInfo` that is not a local model: what a generator running the model in
    another process would describe."""

    def __init__(self, tokenizer_of) -> None:
        self._local = tokenizer_of
        self.model_id = "elsewhere:" + tokenizer_of.model_id
        self.context_window = tokenizer_of.context_window
        self.special_tokens = list(tokenizer_of.special_tokens)

    def encode(self, text):
        return self._local.encode(text)

    def decode(self, ids):
        return self._local.decode(ids)

    def count_tokens(self, text):
        return self._local.count_tokens(text)

    def describe(self):
        return "another process"


class _ElsewhereGenerator:
    """The `Generator` interface and nothing more: no `.model` for the engine to reach."""

    def __init__(self, inner) -> None:
        self._inner = inner
        self.info = _ElsewhereInfo(inner.model)

    def submit(self, request):
        return self._inner.submit(request)

    def submit_many(self, request, n):
        return self._inner.submit_many(request, n)

    async def use_adapter(self, name, path=None):
        await self._inner.use_adapter(name, path)

    async def close(self):
        await self._inner.close()


async def test_a_generator_without_a_local_model_tells_a_whole_story(settings, bundled_model):
    generator = _ElsewhereGenerator(SequentialGenerator(bundled_model))
    async with StoryEngine(settings, generator=generator) as engine:
        assert engine.narrator.local_model is None
        opening = await engine.start_story("c1", PREMISE, author=ANN)
        turn = await engine.continue_story("c1", BEN, "The fox found a key.")
        assert opening.text and turn.text
        rows = await engine.store.db.execute_fetchall("SELECT DISTINCT model_id FROM generations")
        assert [row[0] for row in rows] == [generator.info.model_id]


@pytest.mark.parametrize("kind", ["batching", "sequential"])
async def test_the_generator_is_the_one_the_settings_name(settings, kind):
    from storyengine.serving.generators import make_generator

    generator = await asyncio.to_thread(make_generator, settings.replace(generator=kind))
    try:
        assert (
            type(generator).__name__
            == {
                "batching": "BatchingGenerator",
                "sequential": "SequentialGenerator",
            }[kind]
        )
        assert generator.info.context_window == 1024
    finally:
        await generator.close()


async def test_reward_models_read_a_base_model_of_their_own_without_a_local_one(engine):
    from storyengine.learning.best_of import RewardSource

    source = RewardSource(engine.settings, engine.store, lambda: None)
    base = await asyncio.to_thread(source._read_base)
    assert base.model_id == engine.narrator.info.model_id
    assert not base.is_peft and base.model is not engine.narrator.local_model.model


async def test_choosing_again_replaces_ones_earlier_choice(engine):
    """`/pick 1` then `/pick 2`: one preference (2 over 1), not two that contradict."""
    await engine.start_story("c1", PREMISE, author=ANN)
    await engine.retry("c1", by=ANN)
    first, second = [t.generation_id for t in await engine.alternatives("c1")]
    await engine.choose_alternative("c1", 1, by=ANN)
    await engine.choose_alternative("c1", 2, by=ANN)
    await engine.choose_alternative("c1", 2, by=BEN)
    pairs = {(c, r, user) for c, r, user, _ in await engine.store.preference_pairs()}
    assert pairs == {(second, first, "u1"), (second, first, "u2")}


async def test_the_context_viewer_marks_every_part_of_what_the_model_saw(engine):
    await engine.start_story("c1", PREMISE, author=ANN, genre="fairy tale")
    with_opening = await engine.context("c1")
    assert with_opening.exact and [s.kind for s in with_opening.sections] == ["genre", "premise"]
    await engine.set_memory("c1", "The fox is called Rusty.", by=ANN)
    await engine.add_lore("c1", "Rusty", "fox, rusty", "a red fox afraid of water", by=ANN)
    await engine.set_authors_note("c1", "The mood turns spooky.", by=ANN)
    for line in ("The fox found a key.", "Rusty opened a door.", "A wind blew."):
        await engine.continue_story("c1", BEN, line)
    view = await engine.context("c1")
    assert view.exact  # the parts rebuild the stored prompt exactly
    kinds = [s.kind for s in view.sections]
    assert kinds[:4] == ["genre", "memory", "lore", "premise"] and "note" in kinds
    assert "recent" in kinds and kinds[-1] == "recent"
    lore = next(s for s in view.sections if s.kind == "lore")
    assert lore.label == "Rusty" and lore.budget == 160
    assert sum(s.tokens for s in view.sections) >= view.tokens - 2
    text = view.describe()
    assert "[Lore: Rusty]" in text and "[Author's note]" in text and "never cut" in text

    await engine.set_memory("c1", "Now about an owl.", by=ANN)
    changed = await engine.context("c1")
    assert not changed.exact and "The fox is called Rusty." in changed.prompt
    assert "changed since" in changed.describe()


async def test_the_context_viewer_needs_a_reply_to_show(engine):
    with pytest.raises(NoActiveStory):
        await engine.context("nowhere")


async def test_the_storyteller_drafts_characters_and_settings(engine):
    await engine.start_story("c1", PREMISE, author=ANN)
    rusty = await engine.draft_card("c1", "character", name="Rusty", hint="a shy fox")
    assert rusty.name == "Rusty" and rusty.triggers == ("Rusty",)
    assert rusty.text.startswith("Rusty looked") and len(rusty.text) <= 400
    assert await engine.lore("c1") == []  # a draft, not a card yet
    place = await engine.draft_card("c1", "setting", hint="a foggy marsh")
    assert place.name == "Old Mill" and place.text.startswith("The old mill was")
    await engine.add_lore("c1", rusty.name, rusty.triggers, rusty.text, by=ANN)
    anon = await engine.draft_card("c1", "character")
    assert anon.name == "Mira"  # names not yet taken in the story's lore
    with pytest.raises(InvalidInput):
        await engine.draft_card("c1", "spaceship")


async def test_a_full_lore_still_takes_a_card_that_replaces_one(tiny_engine):
    """At the limit, a card whose name matches one already there (once its spaces are
    tidied, as names are stored) replaces it instead of being refused."""
    await tiny_engine.start_story("c1", PREMISE, author=ANN)
    for i in range(50):
        await tiny_engine.add_lore("c1", f"Card {i}", f"w{i}", "text", by=ANN)
    await tiny_engine.add_lore("c1", "  Card   7 ", "w7", "new text", by=ANN)
    cards = {c.name: c.text for c in await tiny_engine.lore("c1")}
    assert len(cards) == 50 and cards["Card 7"] == "new text"
    with pytest.raises(InvalidInput, match="at most 50 lore cards"):
        await tiny_engine.add_lore("c1", "Card 50", "w", "text", by=ANN)
