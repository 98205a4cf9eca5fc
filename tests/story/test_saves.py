"""Save and load: a story as a file, started again in another channel."""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storyengine.errors import InvalidInput, StoryAlreadyRunning, StoryError
from storyengine.records import Author
from storyengine.saves import parse

ANN = Author("u1", "Ann")
BEN = Author("u2", "Ben")
PREMISE = "Once upon a time, a little fox lived at the edge of a big wood."


async def a_told_story(engine, channel: str = "c1") -> str:
    await engine.start_story(channel, PREMISE, author=ANN, genre="fairy tale")
    await engine.set_memory(channel, "The fox is called Rusty.", by=ANN)
    await engine.set_authors_note(channel, "The mood is gentle.", by=ANN)
    await engine.add_lore(channel, "Rusty", "fox, rusty", "a red fox afraid of water", by=ANN)
    await engine.configure_channel(channel, preset_name="gentle", temperature=0.7, by=ANN)
    await engine.continue_story(channel, BEN, "The fox found a key.")
    await engine.retry(channel, by=ANN)
    return await engine.save_story(channel)


async def test_save_then_load_gives_the_same_story_and_it_goes_on(tiny_engine):
    engine = tiny_engine
    saved = await a_told_story(engine)
    data = json.loads(saved)
    assert data["format"] == "taleweaver.story" and data["version"] == 1
    assert [t["kind"] for t in data["turns"]] == ["bot", "user", "bot"]
    assert data["turns"][1]["author"] == "Ben" and "u2" not in saved  # names, never ids
    assert len(data["turns"][2]["alternatives"]) == 1  # the retried reply

    view = await engine.load_story("c2", saved, author=ANN)
    assert view.story.channel == "c2" and view.story.memory == "The fox is called Rusty."
    assert [t.text for t in view.turns] == [t["text"] for t in data["turns"]]
    assert len(await engine.alternatives("c2")) == 2
    assert (await engine.sampling_for("c2")).temperature == 0.7
    assert await engine.save_story("c2") == saved  # the round trip is exact

    # Nothing of it is trained on: no generation records, every line excluded.
    rows = await engine.store.db.execute_fetchall(
        "SELECT train_excluded, generation_id FROM turns WHERE story_id = ?", (view.story.id,)
    )
    assert len(rows) == 4 and all(r[0] == 1 and r[1] is None for r in rows)
    # It goes on, its lore recalled.
    await engine.continue_story("c2", ANN, "Rusty looked at the river.")
    context = await engine.context("c2")
    assert any(s.kind == "lore" and s.label == "Rusty" for s in context.sections)


async def test_loading_where_a_story_runs_is_refused(tiny_engine):
    engine = tiny_engine
    saved = await a_told_story(engine)
    with pytest.raises(StoryAlreadyRunning):
        await engine.load_story("c1", saved, author=ANN)


async def test_a_round_robin_game_loads_with_its_loader_seated(tiny_engine):
    engine = tiny_engine
    await engine.start_story("g1", PREMISE, author=ANN, mode="round-robin")
    saved = await engine.save_story("g1")
    await engine.load_story("g2", saved, author=BEN)
    state = await engine.turn_state("g2")
    assert [p.user_name for p in state.players] == ["Ben"] and state.current.user_name == "Ben"


SAVED = json.dumps(
    {
        "format": "taleweaver.story",
        "version": 1,
        "premise": PREMISE,
        "genre": "fairy tale",
        "mode": "solo",
        "memory": "The fox is called Rusty.",
        "authors_note": "",
        "settings": {"preset": "gentle", "sampling": {"temperature": 0.7}},
        "lore": [{"name": "Rusty", "triggers": ["fox", "rusty"], "text": "a red fox"}],
        "turns": [
            {"kind": "bot", "author": None, "text": "Rusty lived by a river.", "alternatives": []},
            {"kind": "user", "author": "Ben", "text": "The fox found a key."},
            {"kind": "bot", "author": None, "text": "It opened a door.", "alternatives": ["No."]},
        ],
    }
)
"""A story file as `save_story` writes one, for the tests of what loading refuses."""


def mutate(saved: str, path: list, value) -> str:
    data = json.loads(saved)
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    return json.dumps(data)


@pytest.mark.parametrize(
    "path, value, message",
    [
        (["format"], "sillytavern", '"format" should be "taleweaver.story"'),
        (["version"], 2, "saved by a newer Taleweaver"),
        (["version"], "1", '"version": expected a whole number'),
        (["premise"], "", '"premise": expected a text of 1 to'),
        (["premise"], "x" * 5000, '"premise": expected a text of 1 to'),
        (["mode"], "chaos", '"mode": expected one of solo, round-robin, companion'),
        (["turns", 1, "text"], 7, '"turns[1].text": expected a text'),
        (["turns", 1, "kind"], "narrator", '"turns[1].kind": expected one of user, bot'),
        (["turns", 1, "alternatives"], ["x"], '"turns[1].alternatives": only the storyteller'),
        (["turns", 2, "alternatives"], "x", '"turns[2].alternatives": expected a list'),
        (["lore", 0, "triggers"], "fox", '"lore[0].triggers": expected a list'),
        (["lore", 0], "Rusty", '"lore[0]": expected an object'),
        (["settings", "sampling"], {"temperature": 9}, '"settings": temperature must be'),
        (["settings", "sampling"], {"colour": 1}, '"settings": '),
        (["settings", "preset"], "spicy", '"settings": '),
        (["turns"], [{"kind": "bot", "text": "\u0000"}], "A turn is empty"),
    ],
)
async def test_a_bad_file_says_which_field_and_changes_nothing(tiny_engine, path, value, message):
    engine, saved = tiny_engine, SAVED
    before = await engine.store.db.execute_fetchall("SELECT COUNT(*) FROM turns")
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        await engine.load_story("c2", mutate(saved, path, value), author=ANN)
    assert await engine.find_story("c2") is None
    assert await engine.store.db.execute_fetchall("SELECT COUNT(*) FROM turns") == before


async def test_truncated_or_foreign_files_are_refused_clearly(tiny_engine):
    engine, saved = tiny_engine, SAVED
    for raw, message in [
        (saved[: len(saved) // 2], "not JSON"),
        (b"\xff\xfe\x00", "not JSON"),
        ("[1, 2]", "not a story file"),
        (json.dumps({"spec": "chara_card_v2", "data": {}}), "not a story file"),
    ]:
        with pytest.raises(InvalidInput, match=message):
            await engine.load_story("c2", raw, author=ANN)
    assert await engine.find_story("c2") is None


async def test_unknown_fields_are_ignored(tiny_engine):
    engine, saved = tiny_engine, SAVED
    data = json.loads(saved)
    data["from_the_future"] = {"x": 1}
    data["turns"][0]["mood"] = "happy"
    view = await engine.load_story("c2", json.dumps(data), author=ANN)
    assert len(view.turns) == 3


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_fuzzed_files_load_or_are_refused_never_anything_else(data):
    """`parse` alone (the engine's checks come after it): any mutation of a valid file
    loads, or raises `InvalidInput`."""
    base = {
        "format": "taleweaver.story",
        "version": 1,
        "premise": PREMISE,
        "turns": [{"kind": "bot", "text": "A tale.", "alternatives": ["Another."]}],
        "lore": [{"name": "Rusty", "triggers": ["fox"], "text": "a fox"}],
        "settings": {"preset": None, "sampling": {}},
    }
    junk = st.one_of(
        st.none(),
        st.booleans(),
        st.integers(),
        st.floats(),
        st.text(max_size=20),
        st.lists(st.integers(), max_size=3),
        st.dictionaries(st.text(max_size=5), st.integers()),
    )
    raw = json.dumps(base)
    if data.draw(st.booleans()):
        key = data.draw(st.sampled_from(sorted(base)))
        base[key] = data.draw(junk)
        raw = json.dumps(base)
    else:
        cut = data.draw(st.integers(0, len(raw)))
        raw = raw[:cut]
    try:
        parse(raw, max_text=1000)
    except InvalidInput:
        pass
    except StoryError as exc:  # pragma: no cover - a subclass would do too
        raise AssertionError(exc) from exc
