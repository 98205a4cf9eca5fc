"""One adapter per community: a community's round learns from its own feedback only,
grows its own lineage from the adapter it was served, and its stories are served that
adapter while other communities keep the shared one."""

from __future__ import annotations

import pytest

from storyengine.config import Settings
from storyengine.learning.datasets import DatasetConfig, build_datasets
from storyengine.learning.registry import AdapterRegistry
from storyengine.learning.rounds import RoundConfig, run_round
from storyengine.learning.scheduling import TrainingSchedule, TrainingScheduler
from storyengine.learning.training import TrainConfig
from storyengine.records import Author
from storyengine.storage.store import Store
from storyengine.story.engine import StoryEngine
from tests.helpers.models import record_text

LIKED = "The little cat found a warm, sunny spot and purred happily."
DISLIKED = "The dog barked and barked and barked at nothing at all."


async def feedback_in(store: Store, community: str, stories: int) -> None:
    await store.set_learning(community, True, None)
    for n in range(stories):
        story = await store.create_story(
            f"{community}-{n}", "Premise.", genre=None, mode="solo", created_by="u",
            community=community,
        )  # fmt: skip
        prompt = f"Once upon a time, in {community}'s story {n}, there was a garden.\n"
        for text, value in ((LIKED, 1.0), (DISLIKED, -1.0)):
            g = await record_text(store, story.id, prompt, text)
            await store.set_feedback(
                g, f"{community}-user{n % 7}", "👍" if value > 0 else "👎", value
            )


async def test_datasets_and_due_rounds_are_per_community(tmp_path):
    store = await Store(tmp_path / "s.db").open()
    await feedback_in(store, "A", 5)
    await feedback_in(store, "B", 2)
    a = await build_datasets(store, DatasetConfig(community="A", heldout_fraction=0))
    everyone = await build_datasets(store, DatasetConfig(heldout_fraction=0))
    assert len(a.examples) == 10 and len(everyone.examples) == 14
    assert all("A's story" in e.prompt for e in a.examples)
    settings = Settings(db_path=tmp_path / "s.db", adapter_dir=tmp_path / "adapters")
    scheduler = TrainingScheduler(settings, store, TrainingSchedule(8, 3600.0))
    # A has 10 new votes, B 4, all of them 14: the shared lineage is the most due.
    assert await scheduler.next_round() == ("14 new reactions and choices", None)
    await store.start_training_run("kto")  # the shared round ran
    assert await scheduler.next_round() == ("10 new reactions and choices in community A", "A")
    await store.close()


@pytest.mark.slow
async def test_a_community_round_grows_its_own_lineage_and_serves_it(tmp_path, own_bundled_model):
    from storyengine.serving.generation import SequentialGenerator

    db = tmp_path / "s.db"
    store = await Store(db).open()
    await feedback_in(store, "A", 30)
    await store.close()
    settings = Settings(db_path=db, adapter_dir=tmp_path / "adapters", device="cpu")
    config = RoundConfig(
        method="kto",
        community="A",
        train=TrainConfig(learning_rate=5e-4, batch_size=8, max_length=128),
        drift_guard=None,
        reward=None,
    )
    result = await run_round(settings, config, say=lambda line: None)
    assert result.version is not None and result.version.community == "A"

    store = await Store(db).open()
    registry = AdapterRegistry(store, settings.adapter_dir)
    assert await registry.promoted(None) is None  # the shared lineage is untouched
    runs = await store.db.execute_fetchall("SELECT community FROM training_runs")
    assert [r[0] for r in runs] == ["A"]
    if result.status != "promoted":  # the gate's call; serving is what is tested below
        await registry.promote(result.version.version)
    await store.close()

    async with StoryEngine(settings, generator=SequentialGenerator(own_bundled_model)) as engine:
        ann = Author("1", "Ann")
        in_a = await engine.start_story("a", "Once upon a time.", author=ann, community="A")
        in_b = await engine.start_story("b", "Once upon a time.", author=ann, community="B")
        served = {
            row[0]: row[1]
            for row in await engine.store.db.execute_fetchall(
                "SELECT id, adapter_id FROM generations WHERE id IN (?, ?)",
                (in_a.generation_id, in_b.generation_id),
            )
        }
    assert served == {in_a.generation_id: result.version.name, in_b.generation_id: None}
