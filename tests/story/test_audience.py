"""Round-robin games, companion choices, reactions and forgetting: the engine side of
what the Discord bot does."""

import pytest

from storyengine.config import Settings
from storyengine.errors import ConfigError, InvalidInput, NotYourTurn
from storyengine.records import Author
from storyengine.serving.generation import SequentialGenerator
from storyengine.story.engine import StoryEngine
from storyengine.story.telling import BRIDGE_TOKENS

ANN, BEN, CAT = Author("1", "Ann"), Author("2", "Ben"), Author("3", "Cat")
PREMISE = "Once upon a time, three friends found a map in an old book."


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
async def game(engine, clock):
    engine.clock = clock
    await engine.start_story("g", PREMISE, author=ANN, mode="round-robin")
    await engine.join("g", BEN)
    await engine.join("g", CAT)
    return engine


async def test_round_robin_turns_rotate_in_join_order(game, clock):
    state = await game.turn_state("g")
    assert [p.user_name for p in state.active_players] == ["Ann", "Ben", "Cat"]
    assert state.current.user_name == "Ann" and state.deadline == clock.now + 600

    with pytest.raises(NotYourTurn, match="It is Ann's turn"):
        await game.continue_story("g", BEN, "Ben jumps in.")
    with pytest.raises(NotYourTurn, match="Join the game first"):
        await game.continue_story("g", Author("9", "Zed"), "Me too!")

    result = await game.continue_story("g", ANN, "Ann unfolds the map.")
    record = await game.store.generation(result.generation_id)
    assert record["params"]["max_new_tokens"] == BRIDGE_TOKENS  # a short bridge
    assert (await game.turn_state("g")).current.user_name == "Ben"

    with pytest.raises(NotYourTurn):
        await game.pass_turn("g", ANN)
    assert (await game.pass_turn("g", ANN, moderator=True)).current.user_name == "Cat"
    await game.continue_story("g", CAT, "Cat points at an island.")
    assert (await game.turn_state("g")).current.user_name == "Ann"  # wraps round

    state = await game.leave("g", ANN)  # leaving on your own turn passes it
    assert state.current.user_name == "Ben"
    assert [p.user_name for p in state.active_players] == ["Ben", "Cat"]
    with pytest.raises(InvalidInput, match="already"):
        await game.join("g", BEN)
    state = await game.join("g", ANN)  # a returning player sits at the end
    assert [p.user_name for p in state.active_players] == ["Ben", "Cat", "Ann"]


async def test_an_untaken_turn_passes_and_the_deadline_survives_a_restart(
    game, clock, settings, bundled_model
):
    await game.set_turn_timeout("g", 120)
    await game.pass_turn("g", ANN)  # Ben's turn, with the channel's 120 s timeout
    state = await game.turn_state("g")
    assert state.current.user_name == "Ben" and state.deadline == clock.now + 120
    clock.now += 60
    assert await game.expire_turns() == []
    await game.close()

    # A new process: the deadline was stored, and passes once its time has come.
    async with StoryEngine(settings, generator=SequentialGenerator(bundled_model)) as engine:
        engine.clock = clock
        clock.now += 61
        moved = await engine.expire_turns()
        assert [(c, s.current.user_name) for c, s in moved] == [("g", "Cat")]
        assert (await engine.turn_state("g")).deadline == clock.now + 120
        assert await engine.expire_turns() == []


async def test_round_robin_commands_need_a_round_robin_story(engine):
    await engine.start_story("s", PREMISE, author=ANN)
    with pytest.raises(InvalidInput, match="not a round-robin"):
        await engine.join("s", BEN)
    await engine.continue_story("s", BEN, "Anyone may continue a solo story.")


async def test_companion_choice_is_recorded_as_a_preference(engine):
    await engine.start_story("dm", PREMISE, author=ANN, mode="companion")
    offered = await engine.offer_choices("dm", ANN, "Ann opens the book.", count=3)
    assert len(offered.options) == 3
    assert len({o.text for o in offered.options}) == 3  # different seeds, different text
    assert offered.user_turn.text == "Ann opens the book."
    before = len((await engine.view("dm")).turns)

    result = await engine.choose("dm", offered.id, 2, ANN)
    assert result.text == offered.options[1].text
    view = await engine.view("dm")
    assert (
        len(view.turns) == before + 1
        and view.turns[-1].generation_id == offered.options[1].generation_id
    )
    pairs = await engine.store.preference_pairs()
    chosen = offered.options[1].generation_id
    rejected = {offered.options[0].generation_id, offered.options[2].generation_id}
    assert {(c, r) for c, r, _, _ in pairs} == {(chosen, r) for r in rejected}
    assert {(u, s) for _, _, u, s in pairs} == {("1", "choice")}

    with pytest.raises(InvalidInput, match="closed"):
        await engine.choose("dm", offered.id, 1, ANN)
    second = await engine.offer_choices("dm", ANN, count=2)
    await engine.continue_story("dm", ANN, "Never mind, go on.")  # moving on expires it
    with pytest.raises(InvalidInput, match="closed"):
        await engine.choose("dm", second.id, 1, ANN)


async def test_reactions_one_row_per_user_and_emoji(engine):
    result = await engine.start_story("c", PREMISE, author=ANN)
    await engine.link_message("m1", result.generation_id)
    assert await engine.record_reaction("m1", "1", "👍", added=True)
    assert await engine.record_reaction("m1", "1", "👍", added=True)  # twice: still one row
    assert await engine.record_reaction("m1", "2", "👎", added=True)
    assert await engine.record_reaction("m1", "1", "❤️", added=True)
    assert await engine.record_reaction("m1", "3", "🎉", added=True)
    assert not await engine.record_reaction("unknown", "1", "👍", added=True)
    rows = await engine.store.feedback(result.generation_id)
    assert sorted(rows) == sorted(
        [("1", "👍", 1.0), ("2", "👎", -1.0), ("1", "❤️", 1.0), ("3", "🎉", 0.0)]
    )
    assert await engine.record_reaction("m1", "1", "👍", added=False)
    assert sorted(await engine.store.feedback(result.generation_id)) == sorted(
        [("2", "👎", -1.0), ("1", "❤️", 1.0), ("3", "🎉", 0.0)]
    )


async def test_forget_me_deletes_feedback_and_anonymises_lines(engine, clock):
    engine.clock = clock
    await engine.start_story("g", PREMISE, author=ANN, mode="round-robin")
    await engine.join("g", BEN)
    result = await engine.continue_story("g", ANN, "Ann reads the map aloud.")
    await engine.link_message("m", result.generation_id)
    await engine.record_reaction("m", "1", "👍", added=True)
    await engine.record_reaction("m", "2", "👍", added=True)
    await engine.start_story("dm", PREMISE, author=ANN, mode="companion")
    offered = await engine.offer_choices("dm", ANN, count=2)
    await engine.choose("dm", offered.id, 1, ANN)

    data = await engine.export_user_data("1")
    assert [t["text"] for t in data["turns"]] == ["Ann reads the map aloud."]
    assert [r["emoji"] for r in data["reactions"]] == ["👍"]

    report = await engine.forget_user("1")
    assert (report.feedback_deleted, report.preferences_deleted, report.turns_anonymised) == (
        1,
        1,
        1,
    )
    assert await engine.store.feedback(result.generation_id) == [("2", "👍", 1.0)]
    turn = (await engine.view("g")).turns[1]
    assert turn.text == "Ann reads the map aloud."  # the shared story keeps the line
    # The line is theirs under an alias that only the forget list links to them.
    assert turn.author_id.startswith("forgotten:") and turn.author_name == "a former player"
    rows = await engine.store.db.execute_fetchall(
        "SELECT train_excluded FROM turns WHERE id = ?", (turn.id,)
    )
    assert rows[0][0] == 1
    state = await engine.turn_state("g")
    assert [p.user_name for p in state.active_players] == ["Ben"]
    assert not await engine.record_reaction("m", "1", "👎", added=True)  # never recorded again
    after = await engine.export_user_data("1")
    assert after["reactions"] == [] and after["preferences"] == []
    assert after["forgotten"] == {"alias": turn.author_id}
    assert [(t["text"], t["author_name"]) for t in after["turns"]] == [
        ("Ann reads the map aloud.", "a former player")
    ]


def test_reaction_values_and_turn_timeout_settings():
    settings = Settings.from_env(
        {"STORY_REACTION_VALUES": "👍=1, 😂=0.5", "STORY_TURN_TIMEOUT": "90"}
    )
    assert settings.reaction_values == (("👍", 1.0), ("😂", 0.5))
    assert settings.turn_timeout_s == 90
    with pytest.raises(ConfigError, match="STORY_REACTION_VALUES"):
        Settings.from_env({"STORY_REACTION_VALUES": "👍:1"})
    with pytest.raises(ConfigError, match="STORY_TURN_TIMEOUT"):
        Settings.from_env({"STORY_TURN_TIMEOUT": "5"})


async def test_choices_are_sampled_even_when_the_channel_uses_beam_search(engine):
    await engine.start_story("dm", PREMISE, author=ANN, mode="companion")
    await engine.configure_channel("dm", preset_name="focused")
    offered = await engine.offer_choices("dm", ANN, "Ann smiles.", count=2)
    assert offered.options[0].text != offered.options[1].text
