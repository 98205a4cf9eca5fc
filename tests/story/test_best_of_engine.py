"""Best-of-n through the engine: with a reward model promoted, a turn writes `best_of`
candidates with one shared prefill, shows the one the reward model scores best, keeps
the others as alternatives best first, and a retry shows the next best before it
writes anew. Without a reward model, one candidate, as before."""

from __future__ import annotations

from storyengine.learning.best_of import base_copy
from storyengine.learning.datasets import FeedbackDatasets, LabelledExample
from storyengine.learning.reward import RewardConfig, RewardModel
from storyengine.records import Author

ANN = Author("1", "Ann")
PROMPT = "Once upon a time, Lily went to the park.\n"


async def promote_a_reward_model(engine) -> RewardModel:
    """A real reward model, trained on a few labels on the engine's own base model."""
    base = base_copy(engine.narrator.local_model)
    liked = ["A cat sat on the bench.", "The cat purred.", "Her cat slept."]
    disliked = ["It rained all day.", "The ball was old.", "She went home."]
    examples = [
        LabelledExample(PROMPT, text, label, 1.0 if label else -1.0, i, "train", i)
        for i, (text, label) in enumerate(
            [(t, True) for t in liked] + [(t, False) for t in disliked]
        )
    ]
    model = RewardModel.train(base, FeedbackDatasets(examples=examples), RewardConfig())
    registry = engine.rewards.registry
    version = await registry.register(model.save)
    await registry.promote(version.version)
    return model


async def turn_generations(engine, shown: int) -> list[dict]:
    rows = await engine.store.db.execute_fetchall(
        "SELECT id, output, reward, candidate_of FROM generations WHERE candidate_of = ?"
        " ORDER BY reward DESC",
        (shown,),
    )
    return [dict(r) for r in rows]


async def test_without_a_reward_model_a_turn_writes_one_continuation(tiny_engine):
    engine = tiny_engine
    await engine.start_story("c", "Once upon a time, a fox.", author=ANN)
    await engine.configure_channel("c", best_of=4)
    before = await engine.store.db.execute_fetchall("SELECT COUNT(*) FROM generations")
    await engine.continue_story("c", ANN, "The fox ran.")
    after = await engine.store.db.execute_fetchall("SELECT COUNT(*) FROM generations")
    assert after[0][0] - before[0][0] == 1


async def test_best_of_n_shows_the_best_keeps_the_rest_and_retry_shows_the_next(tiny_engine):
    engine = tiny_engine
    model = await promote_a_reward_model(engine)
    await engine.start_story("c", "Once upon a time, a fox.", author=ANN)
    await engine.configure_channel("c", best_of=4, temperature=1.0)
    scheduler = engine.narrator.generator
    prefilled = scheduler.prefilled_tokens
    result = await engine.continue_story("c", ANN, "The fox ran.")
    group = await turn_generations(engine, result.generation_id)
    assert len(group) == 4 and group[0]["id"] == result.generation_id  # the best is shown
    prompt = (
        await engine.store.db.execute_fetchall(
            "SELECT prompt, prompt_tokens FROM generations WHERE id = ?", (result.generation_id,)
        )
    )[0]
    assert scheduler.prefilled_tokens - prefilled == prompt[1]  # one prefill for all four
    rescored = model.score([prompt[0]] * 4, [g["output"] for g in group])
    assert [round(r, 4) for r in rescored] == [round(g["reward"], 4) for g in group]
    assert rescored == sorted(rescored, reverse=True)

    alternatives = await engine.alternatives("c")
    assert [t.generation_id for t in alternatives] == [g["id"] for g in group]

    count = await engine.store.db.execute_fetchall("SELECT COUNT(*) FROM generations")
    for expected in group[1:]:  # each retry shows the next best, writing nothing new
        retried = await engine.retry("c", by=ANN)
        assert retried.generation_id == expected["id"]
        assert retried.text == expected["output"]
    assert await engine.store.db.execute_fetchall("SELECT COUNT(*) FROM generations") == count
    fresh = await engine.retry("c", by=ANN)  # all shown: four new candidates
    assert len(await turn_generations(engine, fresh.generation_id)) == 4


async def test_best_of_n_still_runs_once_an_adapter_is_served(tiny_engine):
    """The reward model's private base model used to be a deep copy of the serving
    model: once a promoted adapter was loaded there (peft layers, the scheduler's
    per-row state), the copy failed and every turn quietly wrote one candidate."""
    import torch

    from tests.learning.test_adapters import lora_saver

    engine = tiny_engine
    serving = engine.narrator.local_model
    plain = {k: v.clone() for k, v in serving.model.state_dict().items()}
    adapter = await engine.registry.register(lora_saver(serving.model, 3), method="kto")
    await engine.registry.promote(adapter.version)
    await engine.start_story("c", "Once upon a time, a fox.", author=ANN)  # now served
    assert hasattr(engine.narrator.local_model.model, "peft_config")

    copied = base_copy(engine.narrator.local_model)
    own = copied.model.state_dict()
    assert not hasattr(copied.model, "peft_config") and own.keys() == plain.keys()
    assert all(torch.equal(own[k], plain[k]) for k in plain)  # the base, not the adapter

    await promote_a_reward_model(engine)
    await engine.configure_channel("c", best_of=3, temperature=1.0)
    result = await engine.continue_story("c", ANN, "The fox ran.")
    assert len(await turn_generations(engine, result.generation_id)) == 3
