"""Training data from feedback: built from a real SQLite file, no model needed."""

import asyncio
import json
import os
import subprocess
import sys

import pytest

from storyengine.learning.datasets import DatasetConfig, build_datasets, story_split
from storyengine.storage.store import Store
from tests.helpers.models import record_text


class World:
    """A story database written through the store, as the engine would."""

    def __init__(self, store: Store) -> None:
        self.store = store
        self.stories: dict[str, int] = {}

    async def story(self, channel: str, community: str | None = None) -> int:
        story = await self.store.create_story(
            channel, "Premise.", genre=None, mode="solo", created_by="u", community=community
        )
        self.stories[channel] = story.id
        return story.id

    async def generation(self, story_id: int, prompt: str, output: str) -> int:
        return await record_text(self.store, story_id, prompt, output)

    async def vote(self, generation_id: int, user: str, value: float, emoji: str = "👍") -> None:
        await self.store.set_feedback(generation_id, user, emoji, value)


@pytest.fixture
async def world(tmp_path):
    store = await Store(tmp_path / "f.db").open()
    yield World(store)
    await store.close()


async def test_choice_retry_and_score_pairs(world):
    s = await world.story("a")
    # A companion choice: option 1 chosen over options 2 and 3.
    opts = [await world.generation(s, "P1", f"Option {i}.") for i in (1, 2, 3)]
    await world.store.add_preference_pairs(opts[0], opts[1:], "u1", "choice")
    # A retry whose replacement was then liked.
    old = await world.generation(s, "P2", "The old one.")
    new = await world.generation(s, "P2", "The new one.")
    first = await world.store.add_turn(
        s, action=1, kind="bot", text="The old one.", generation_id=old
    )
    await world.store.add_turn(
        s,
        action=1,
        kind="bot",
        text="The new one.",
        generation_id=new,
        position=first.position,
        replacing=first.id,
    )
    await world.vote(new, "u2", 1)
    # Two continuations of one prompt, two points apart.
    good = await world.generation(s, "P3", "Loved.")
    bad = await world.generation(s, "P3", "Hated.")
    for user in ("u3", "u4"):
        await world.vote(good, user, 1)
    await world.vote(bad, "u3", -1, "👎")

    data = await build_datasets(world.store, DatasetConfig(pair_margin=2.0))
    got = {(p.source, p.chosen, p.rejected) for p in data.pairs}
    assert got == {
        ("choice", "Option 1.", "Option 2."),
        ("choice", "Option 1.", "Option 3."),
        ("retry", "The new one.", "The old one."),
        ("score", "Loved.", "Hated."),
    }
    assert all(p.prompt in {"P1", "P2", "P3"} for p in data.pairs)
    labels = {(e.completion, e.label) for e in data.examples}
    assert labels == {("The new one.", True), ("Loved.", True), ("Hated.", False)}


async def test_ties_are_left_out_and_one_user_cannot_dominate(world):
    s = await world.story("a")
    tied = await world.generation(s, "P", "Tied.")
    await world.vote(tied, "u1", 1)
    await world.vote(tied, "u2", -1, "👎")
    # One eager user votes on 40 generations; another votes once.
    eager = [await world.generation(s, f"Q{i}", f"Eager {i}.") for i in range(40)]
    for i, g in enumerate(eager):
        await world.vote(g, "eager", 1 if i % 2 else -1, "👍" if i % 2 else "👎")
    data = await build_datasets(world.store, DatasetConfig(per_user_cap=20))
    assert "Tied." not in {e.completion for e in data.examples}
    weights = {abs(e.score) for e in data.examples}
    assert weights == {0.5}  # 40 votes share the weight of 20


async def test_the_cap_is_per_round(world):
    """40 votes split 20 and 20 by a training round each weigh a whole vote; 60 in one
    round share the weight of 20."""
    s = await world.story("a")
    first = [await world.generation(s, f"Q{i}", f"First {i}.") for i in range(20)]
    run = await world.store.start_training_run("dpo")
    await world.store.finish_training_run(run, version=None, error=None, data_until=first[-1])
    second = [await world.generation(s, f"R{i}", f"Second {i}.") for i in range(20)]
    for i, g in enumerate(first + second):
        await world.vote(g, "eager", 1 if i % 2 else -1, "👍" if i % 2 else "👎")
    data = await build_datasets(world.store, DatasetConfig(per_user_cap=20))
    assert {abs(e.score) for e in data.examples} == {1.0}
    third = [await world.generation(s, f"S{i}", f"Third {i}.") for i in range(40)]
    for i, g in enumerate(third):
        await world.vote(g, "eager", 1 if i % 2 else -1, "👍" if i % 2 else "👎")
    data = await build_datasets(world.store, DatasetConfig(per_user_cap=20))
    weights = {e.completion.split()[0]: abs(e.score) for e in data.examples}
    assert weights == {"First": 1.0, "Second": pytest.approx(1 / 3), "Third": pytest.approx(1 / 3)}


async def test_a_run_of_dislikes_is_not_suspicious_where_most_is_disliked(world):
    """Uniform voting is judged against the rest of the audience: where nine in ten
    continuations are disliked, twelve 👎 in a row are what an honest voter casts; twelve
    👍 in a row are not."""
    s = await world.story("a")
    gens = [await world.generation(s, f"P{i}", f"Text {i}.") for i in range(100)]
    for i, g in enumerate(gens):  # the audience: one like in ten
        await world.vote(g, f"voter{i % 7}", 1 if i % 10 == 0 else -1, "👍")
    honest = [await world.generation(s, f"H{i}", f"Honest {i}.") for i in range(12)]
    for g in honest:
        await world.vote(g, "grump", -1, "👎")
    shill = [await world.generation(s, f"S{i}", f"Shill {i}.") for i in range(12)]
    for g in shill:
        await world.vote(g, "shill", 1)
    config = DatasetConfig(uniform_voter_min_votes=10, uniform_voter_weight=0.5)
    data = await build_datasets(world.store, config)
    scores = {e.completion.split()[0]: e.score for e in data.examples}
    assert scores["Honest"] == -1.0
    assert scores["Shill"] == 0.5


async def test_score_pairs_need_one_liked_and_one_disliked(world):
    s = await world.story("a")
    loved = await world.generation(s, "P", "Loved.")
    liked = await world.generation(s, "P", "Liked.")
    hated = await world.generation(s, "P", "Hated.")
    for user in ("u1", "u2", "u3"):
        await world.vote(loved, user, 1)
    await world.vote(liked, "u1", 1)
    await world.vote(hated, "u2", -1, "👎")
    data = await build_datasets(world.store, DatasetConfig(pair_margin=1.0))
    # Loved (+3) over Liked (+1) differs by two votes, but both were liked.
    assert {(p.chosen, p.rejected) for p in data.pairs} == {
        ("Loved.", "Hated."),
        ("Liked.", "Hated."),
    }


async def test_uniform_voters_count_less(world):
    s = await world.story("a")
    gens = [await world.generation(s, f"P{i}", f"Text {i}.") for i in range(12)]
    for g in gens:
        await world.vote(g, "always-up", 1)
    data = await build_datasets(
        world.store, DatasetConfig(uniform_voter_min_votes=10, uniform_voter_weight=0.5)
    )
    assert {e.score for e in data.examples} == {0.5}


async def test_forgotten_users_lines_and_votes_are_not_trained_on(world):
    s = await world.story("a")
    await world.store.add_turn(
        s, action=1, kind="user", text="Secret line.", author_id="gone", author_name="G"
    )
    with_line = await world.generation(s, "Premise.\nSecret line.\n", "Reply.")
    other = await world.generation(s, "Premise.\n", "Other.")
    await world.vote(with_line, "u1", 1)
    await world.vote(other, "gone", 1)
    await world.vote(other, "u1", 1)
    await world.store.forget_user("gone")
    data = await build_datasets(world.store)
    assert [(e.completion, e.score) for e in data.examples] == [("Other.", 1.0)]


async def test_a_story_stays_on_one_side_of_the_split(world):
    config = DatasetConfig(heldout_fraction=0.5, seed=3)
    for n in range(12):
        s = await world.story(f"c{n}")
        for i in range(3):
            g = await world.generation(s, f"P{n}-{i}", f"Text {n} {i}.")
            await world.vote(g, f"u{n}{i}", 1)
    data = await build_datasets(world.store, config)
    sides: dict[int, set[str]] = {}
    for e in data.examples:
        sides.setdefault(e.story_id, set()).add(e.split)
        assert e.split == story_split(e.story_id, config)
    assert all(len(s) == 1 for s in sides.values())
    assert {next(iter(s)) for s in sides.values()} == {"train", "heldout"}


@pytest.mark.slow
async def test_feedback_export_command_writes_jsonl(world, tmp_path):
    s = await world.story("a")
    g = await world.generation(s, "P", "Liked.")
    await world.vote(g, "u1", 1)
    out = tmp_path / "data.jsonl"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    result = await asyncio.to_thread(
        subprocess.run,
        [
            sys.executable,
            "-m",
            "storyengine",
            "feedback",
            "export",
            "--format",
            "jsonl",
            "--db",
            str(world.store.path),
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows == [
        {
            "type": "kto",
            "prompt": "P",
            "completion": "Liked.",
            "label": True,
            "score": 1.0,
            "story_id": s,
            "split": story_split(s, DatasetConfig()),
            "generation_id": g,
        }
    ]
    assert "0 preference pairs, 1 labelled examples" in result.stderr


async def test_training_examples_can_be_limited_to_new_feedback(world):
    config = DatasetConfig(heldout_fraction=0.0)
    s = await world.story("a")
    old = await world.generation(s, "P1", "Old.")
    new = await world.generation(s, "P2", "New.")
    await world.vote(old, "u1", 1)
    await world.vote(new, "u1", 1)
    from dataclasses import replace

    data = await build_datasets(world.store, replace(config, train_after_generation=old))
    assert [e.completion for e in data.examples] == ["New."]


async def test_only_communities_that_switched_learning_on_are_trained_on(world):
    """Learning is opt-in: a server's stories are left out until it is switched on,
    and again once it is switched off; private sessions never count; the operator's
    own stories (no community) always do."""
    outputs = {}
    for channel, community in [
        ("local", None),
        ("guild-a", "111"),
        ("guild-b", "222"),
        ("dm", "dm"),
    ]:
        s = await world.story(channel, community)
        g = await world.generation(s, f"P {channel}", f"Liked in {channel}.")
        await world.vote(g, "u1", 1)
        outputs[channel] = f"Liked in {channel}."

    async def trained_on() -> set[str]:
        data = await build_datasets(world.store, DatasetConfig(heldout_fraction=0.0))
        return {e.completion for e in data.examples}

    assert await trained_on() == {outputs["local"]}
    assert await world.store.new_feedback_count(None) == 1
    await world.store.set_learning("111", True, "admin")
    assert await trained_on() == {outputs["local"], outputs["guild-a"]}
    assert await world.store.new_feedback_count(None) == 2
    await world.store.set_learning("111", False, "admin")
    await world.store.set_learning("222", True, "admin")
    assert await trained_on() == {outputs["local"], outputs["guild-b"]}
    assert await world.store.learning_enabled("222")
    assert not await world.store.learning_enabled("111")


async def test_new_feedback_counts_reactions_and_choices_after_a_time(world):
    s = await world.story("a")
    g1 = await world.generation(s, "P", "One.")
    g2 = await world.generation(s, "P", "Two.")
    await world.vote(g1, "u1", 1)
    await world.vote(g1, "u2", 0, "🤔")  # neutral: not feedback to learn from
    assert await world.store.new_feedback_count(None) == 1
    rows = await world.store.db.execute_fetchall("SELECT MAX(created_at) FROM feedback")
    since = rows[0][0]
    assert await world.store.new_feedback_count(since) == 0
    await asyncio.sleep(0.01)  # the database's clock has millisecond steps
    await world.vote(g2, "u1", -1, "👎")
    choice = await world.store.create_choice(s, 1, "u1", [g1, g2])
    await world.store.close_choice(choice, "chosen")
    assert await world.store.new_feedback_count(since) == 2


async def test_feedback_stats_per_adapter_version_and_community(world):
    a = await world.story("a", "111")
    b = await world.story("b", "222")
    base = await world.generation(a, "P", "Base.")
    tuned = await world.store.record_generation(
        story_id=a, channel="a", prompt="P", output="Tuned.", raw_output="Tuned.", params={},
        model_id="m", adapter_id="v0001", prompt_tokens=1, output_tokens=1,
        finish_reason="eos", latency_s=0.1, ttft_s=0.1,
    )  # fmt: skip
    elsewhere = await world.generation(b, "P", "Elsewhere.")
    await world.vote(base, "u1", -1, "👎")
    await world.vote(tuned, "u1", 1)
    await world.vote(tuned, "u2", 1)
    await world.vote(tuned, "u3", -1, "👎")
    await world.vote(elsewhere, "u1", 1)
    stats = {r["adapter"]: r for r in await world.store.feedback_stats("111")}
    assert stats[None]["liked"] == 0 and stats[None]["disliked"] == 1
    assert stats[None]["approval"] == 0.0
    assert stats["v0001"]["liked"] == 2 and stats["v0001"]["disliked"] == 1
    assert stats["v0001"]["approval"] == pytest.approx(2 / 3)
    everywhere = {r["adapter"]: r for r in await world.store.feedback_stats(None)}
    assert everywhere[None]["liked"] == 1 and everywhere[None]["generations"] == 2


async def test_a_pair_across_two_stories_is_held_out_if_either_story_is(world):
    config = DatasetConfig(heldout_fraction=0.5, seed=3)
    stories = [await world.story(f"c{n}") for n in range(12)]
    sides = {s: story_split(s, config) for s in stories}
    train = [s for s in stories if sides[s] == "train"]
    held = [s for s in stories if sides[s] == "heldout"]
    assert train and held
    for chosen_story, rejected_story in [(train[0], held[0]), (held[1], train[1])]:
        good = await world.generation(chosen_story, f"Same opening {chosen_story}.", "Liked.")
        bad = await world.generation(rejected_story, f"Same opening {chosen_story}.", "Not.")
        await world.vote(good, "u1", 1)
        await world.vote(bad, "u2", -1, "👎")
    good = await world.generation(train[0], "Both train.", "Liked.")
    bad = await world.generation(train[1], "Both train.", "Not.")
    await world.vote(good, "u1", 1)
    await world.vote(bad, "u2", -1, "👎")
    data = await build_datasets(world.store, config)
    splits = {p.prompt: p.split for p in data.pairs}
    assert splits == {
        f"Same opening {train[0]}.": "heldout",
        f"Same opening {held[1]}.": "heldout",
        "Both train.": "train",
    }
