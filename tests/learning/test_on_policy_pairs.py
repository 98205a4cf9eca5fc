"""On-policy pairs: best-of-n candidate groups already in `generations` (hand-made rows
in a real SQLite file, as the engine would write them), made into extra training pairs."""

import pytest

from storyengine.learning.datasets import (
    DatasetConfig,
    build_datasets,
    on_policy_pairs,
    story_split,
)
from storyengine.learning.rounds import RoundConfig, plan_round, round_data
from storyengine.storage.store import Store
from tests.helpers.models import record_text

ALL_TRAIN = DatasetConfig(heldout_fraction=0.0)


@pytest.fixture
async def store(tmp_path):
    store = await Store(tmp_path / "s.db").open()
    yield store
    await store.close()


async def group(
    store: Store, story_id: int, prompt: str, rewards: list[float], *, shown_in_group: bool = True
) -> list[int]:
    """Candidates written for one turn, each with its reward; the first is the one shown.
    The shown one carries its own id as `candidate_of` (or none, `shown_in_group`
    False); the others carry the shown one's."""
    ids = [
        await record_text(store, story_id, prompt, f"Candidate {i} of {prompt!r}.")
        for i in range(len(rewards))
    ]
    for i, (gid, reward) in enumerate(zip(ids, rewards, strict=True)):
        candidate_of = ids[0] if i or shown_in_group else None
        await store.db.execute(
            "UPDATE generations SET reward = ?, candidate_of = ? WHERE id = ?",
            (reward, candidate_of, gid),
        )
    return ids


async def story(store: Store, channel: str, community: str | None = None) -> int:
    created = await store.create_story(
        channel, "P.", genre=None, mode="solo", created_by="u", community=community
    )
    return created.id


async def test_the_best_candidate_over_the_worst_when_far_enough_apart(store):
    s = await story(store, "a")
    wide = await group(store, s, "P1", [0.2, 2.5, -1.0, 0.9])
    narrow = await group(store, s, "P2", [0.1, 0.6, -0.3])  # 0.9 apart: not enough
    alone = await group(store, s, "P3", [5.0])  # a group of one
    pairs = await on_policy_pairs(store, ALL_TRAIN)
    assert [(p.chosen_generation_id, p.rejected_generation_id) for p in pairs] == [
        (wide[1], wide[2])
    ]
    (p,) = pairs
    assert (p.prompt, p.chosen, p.rejected) == (
        "P1",
        "Candidate 1 of 'P1'.",
        "Candidate 2 of 'P1'.",
    )
    assert p.source == "reward" and p.weight == 0.5 and p.split == "train" and p.story_id == s
    assert narrow and alone

    config = DatasetConfig(heldout_fraction=0.0, on_policy_margin=0.5, on_policy_weight=0.25)
    pairs = await on_policy_pairs(store, config)
    assert [(p.chosen_generation_id, p.rejected_generation_id) for p in pairs] == [
        (wide[1], wide[2]),
        (narrow[1], narrow[2]),
    ]
    assert {p.weight for p in pairs} == {0.25}


async def test_a_shown_candidate_without_its_own_group_id_still_belongs(store):
    s = await story(store, "a")
    ids = await group(store, s, "P", [3.0, 0.0], shown_in_group=False)
    (p,) = await on_policy_pairs(store, ALL_TRAIN)
    assert (p.chosen_generation_id, p.rejected_generation_id) == (ids[0], ids[1])


async def test_rows_without_a_reward_or_a_group_make_no_pairs(store):
    s = await story(store, "a")
    await record_text(store, s, "P", "Plain one.")
    await record_text(store, s, "P", "Plain two.")
    ids = await group(store, s, "Q", [2.0, 0.0, -2.0])
    await store.db.execute("UPDATE generations SET reward = NULL WHERE id = ?", (ids[2],))
    (p,) = await on_policy_pairs(store, ALL_TRAIN)  # the unscored one is left out
    assert (p.chosen_generation_id, p.rejected_generation_id) == (ids[0], ids[1])


async def test_consent_forget_me_and_the_training_window_apply(store):
    off = await story(store, "off", community="guild-off")  # learning never switched on
    await group(store, off, "P", [2.0, -2.0])
    forgotten = await story(store, "f")
    await store.add_turn(forgotten, action=1, kind="user", text="Ann's line.", author_id="ann")
    await group(store, forgotten, "Ann's line.\nGo on.", [2.0, -2.0])
    await store.forget_user("ann")
    old = await story(store, "old")
    old_ids = await group(store, old, "Old", [2.0, -2.0])
    new = await story(store, "new")
    new_ids = await group(store, new, "New", [2.0, -2.0])
    config = DatasetConfig(heldout_fraction=0.0, train_after_generation=old_ids[-1])
    pairs = await on_policy_pairs(store, config)
    assert [(p.chosen_generation_id, p.rejected_generation_id) for p in pairs] == [
        (new_ids[0], new_ids[1])
    ]


async def test_held_out_stories_keep_their_split_and_the_gate_never_sees_these_pairs(store):
    """Marked by the same story split as people's pairs; `build_datasets` (what the
    gates judge with) never includes them."""
    config = DatasetConfig(heldout_fraction=0.5)
    sides: dict[str, int] = {}
    n = 0
    while set(sides) != {"train", "heldout"}:
        n += 1
        s = await story(store, f"c{n}")
        sides.setdefault(story_split(s, config), s)
    for s in sides.values():
        await group(store, s, f"P{s}", [1.5, -1.5])
    pairs = await on_policy_pairs(store, config)
    assert {p.story_id: p.split for p in pairs} == {s: side for side, s in sides.items()}
    data = await build_datasets(store, config)
    assert data.pairs == [] and data.examples == []


async def test_a_choice_pair_carries_its_stored_weight(store):
    """People's pairs weigh what `preference_pairs.weight` says (1 by default)."""
    s = await story(store, "a")
    chosen, plain, light = [await record_text(store, s, "P", f"Option {i}.") for i in range(3)]
    await store.add_preference_pairs(chosen, [plain, light], "u1", "choice")
    await store.db.execute(
        "UPDATE preference_pairs SET weight = 0.25 WHERE rejected_generation_id = ?", (light,)
    )
    data = await build_datasets(store, ALL_TRAIN)
    assert {p.rejected_generation_id: p.weight for p in data.pairs} == {plain: 1.0, light: 0.25}


async def test_a_round_trains_on_them_at_their_weight_and_is_judged_without_them(store):
    """An adapter round's data (`round_data`): people's feedback and the reward model's
    training-side pairs; DPO once those make enough pairs, each row with its weight; the
    gate's held-out feedback is people's only."""
    config = DatasetConfig(heldout_fraction=0.5)
    sides: dict[str, list[int]] = {"train": [], "heldout": []}
    n = 0
    while len(sides["train"]) < 8 or len(sides["heldout"]) < 2:
        n += 1
        s = await story(store, f"c{n}")
        sides[story_split(s, config)].append(s)
    for s in sides["train"] + sides["heldout"]:
        await group(store, s, f"P{s}", [1.5, -1.5])
    person = sides["heldout"][0]  # one held-out pair a person made
    chosen, rejected = [await record_text(store, person, "Q", f"Mine {i}.") for i in range(2)]
    await store.add_preference_pairs(chosen, [rejected], "u1", "choice")

    data = await round_data(store, config)
    plan = plan_round(RoundConfig(), data)
    assert plan.method == "dpo" and plan.counts["reward_pairs"] == len(sides["train"])
    assert [row["weight"] for row in plan.rows] == [0.5] * len(sides["train"])
    assert [(p.source, p.chosen_generation_id) for p in plan.heldout_pairs] == [("choice", chosen)]
    assert not any(p.source == "reward" and p.split == "heldout" for p in data.pairs)
    # The reward model itself never learns from them (its own labels).
    from storyengine.learning.reward import RewardConfig, people_feedback

    pairs, _ = people_feedback(data, RewardConfig())
    assert all(p.source != "reward" for p in pairs)
