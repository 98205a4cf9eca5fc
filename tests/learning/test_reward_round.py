"""The reward model in a learning round: trained and judged first, on all the feedback,
registered, reported; the adapter's round goes on as before."""

from dataclasses import replace

import pytest

from storyengine.config import Settings
from storyengine.learning.reward import RewardConfig, RewardRegistry, reward_dir
from storyengine.learning.rounds import run_round
from storyengine.serving.modeling import load_model
from storyengine.storage.store import Store
from tests.helpers.crash_child import round_config
from tests.helpers.models import make_tiny_model, record_text
from tests.learning.test_rounds import DISLIKED, LIKED, make_feedback

pytestmark = pytest.mark.slow


@pytest.fixture
def settings(tmp_path):
    loaded = make_tiny_model(n_positions=1024)  # held-out stories run to 512 tokens
    path = tmp_path / "tiny-gpt2"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return Settings(
        db_path=tmp_path / "s.db",
        adapter_dir=tmp_path / "adapters",
        base_model=str(path),
        device="cpu",
    )


async def more_feedback(db, first: int, stories: int) -> None:
    """Like make_feedback, for stories numbered from `first`."""
    store = await Store(db).open()
    for n in range(first, first + stories):
        story = await store.create_story(f"c{n}", "P.", genre=None, mode="solo", created_by="u")
        prompt = f"Once upon a time, in story number {n}, there was a garden.\n"
        for text, value in ((LIKED, 1.0), (DISLIKED, -1.0)):
            g = await record_text(store, story.id, prompt, text)
            await store.set_feedback(g, f"user{n % 7}", "👍" if value > 0 else "👎", value)
    await store.close()


async def test_a_round_trains_and_reports_its_reward_model_first(settings):
    await make_feedback(settings.database, stories=20)
    lines: list[str] = []
    result = await run_round(settings, round_config(), say=lines.append)
    assert result.status == "promoted", result

    reward = result.metrics["reward"]
    assert reward["status"] == "promoted" and reward["version"] == 1
    # 20 stories, each a pair and two labels: with 4 stories held out (under
    # `cross_validate_below`), it is judged by cross-validation on all and trained on all.
    assert reward["judged_by"] == "cross-validation"
    assert (reward["train"]["pairs"], reward["train"]["labels"]) == (20, 40)
    assert (reward["pairs"], reward["labels"]) == (20, 40)
    assert reward["label_auc"] == 1.0 and reward["p_value"] < 0.05
    assert lines[0].startswith("training kto on")  # the adapter's lines come as before
    assert lines[-1].startswith("reward model r1 promoted: held-out accuracy 1.00 (p = 0.0")
    assert "(cross-validated); trained on 20 pairs and 40 labels" in lines[-1]

    store = await Store(settings.database).open()
    registry = RewardRegistry(store, reward_dir(settings), lock_dir=settings.adapter_dir)
    (version,) = await registry.list()
    assert version.status == "promoted" and version.community is None
    assert version.data_counts == {
        "train_pairs": 20,
        "train_labels": 40,
        "heldout_pairs": 20,
        "heldout_labels": 40,
        "judged_by": "cross-validation",
    }
    # What the round registered scores on the served base model, liked above disliked.
    model = registry.load(version, load_model(settings))
    liked, disliked = model.score(
        ["Once upon a time, there was a garden.\n"] * 2, [LIKED, DISLIKED]
    )
    assert liked > disliked

    # The next round: the adapter learns from the new feedback only, the reward model
    # from all of it, and is judged against r1 on the same held-out examples.
    await store.close()
    await more_feedback(settings.database, 21, 10)
    result = await run_round(settings, round_config(), say=lines.append)
    reward = result.metrics["reward"]
    assert reward["train"]["labels"] > 32 and reward["current_version"] == 1
    assert result.metrics["train"]["examples"] < reward["train"]["labels"]
    assert reward["status"] == "promoted", reward  # as good as r1: it replaces it


async def test_too_little_for_a_reward_model_is_said_and_the_adapter_still_trains(settings):
    await make_feedback(settings.database, stories=20)
    config = replace(round_config(), reward=RewardConfig(min_heldout=100, cross_validate_below=0))
    lines: list[str] = []
    result = await run_round(settings, config, say=lines.append)
    assert result.status == "promoted"
    assert result.metrics["reward"] == {
        "status": "skipped",
        "reason": "too little held-out feedback to judge one: 12 held-out examples"
        " (a reward model needs 100)",
    }
    assert lines[-1] == "reward model skipped: " + result.metrics["reward"]["reason"]
    assert not reward_dir(settings).exists()


async def test_the_reward_model_learns_even_when_the_adapter_cannot_yet(settings):
    """DPO asked for and too few preference pairs: the adapter's round is skipped, with
    its reason, but the reward model (which learns from single reactions too) trains,
    and best-of-n can start serving better continuations right away."""
    await make_feedback(settings.database, stories=20)
    lines: list[str] = []
    config = replace(round_config(), method="dpo")
    config = replace(config, train=replace(config.train, min_examples=1000))
    result = await run_round(settings, config, say=lines.append)
    assert result.status == "skipped" and "preference pairs" in result.reason
    assert result.metrics["reward"]["status"] == "promoted"
    assert lines[-1].startswith("reward model r1 promoted")
    store = await Store(settings.database).open()
    try:
        rewards = RewardRegistry(store, reward_dir(settings), lock_dir=settings.adapter_dir)
        assert (await rewards.promoted()).version == 1
        runs = await store.db.execute_fetchall("SELECT status, version FROM training_runs")
        assert [tuple(r) for r in runs] == [("done", None)]
    finally:
        await store.close()


async def test_with_few_pairs_a_round_samples_its_own_with_a_judge_fitted_on_the_training_side(
    settings,
):
    """Round 1 promotes a reward model (the adapter's round on labels, KTO). Round 2,
    `auto`, with a handful of new labels and no pairs: it fits a judge on the training
    side, samples continuations of people's prompts with the adapter it starts from,
    and trains DPO on the pairs the judge ranks far enough apart (the judge's scale on
    a tiny random model: a margin of 0 keeps every pair whose scores differ). The
    gate still judges on people's held-out feedback."""
    await make_feedback(settings.database, stories=20)
    first = await run_round(settings, round_config(), say=lambda _: None)
    assert first.metrics["reward"]["status"] == "promoted"
    store = await Store(settings.database).open()
    for n in range(40, 52):  # single labels, no pairs: KTO planned
        story = await store.create_story(f"c{n}", "P.", genre=None, mode="solo", created_by="u")
        g = await record_text(store, story.id, f"Once upon a time, in story {n}.\n", LIKED)
        await store.set_feedback(g, f"user{n % 7}", "👍" if n % 3 else "👎", 1.0 if n % 3 else -1.0)
    await store.close()
    config = replace(round_config(), method="auto")
    config = replace(config, data=replace(config.data, on_policy_margin=0.0))
    lines: list[str] = []
    result = await run_round(settings, config, say=lines.append)
    assert any(line.startswith("sampling 4 continuations of") for line in lines), lines
    sampled = result.version.data_counts["sampled_pairs"]
    assert sampled > 0 and result.version.method == "dpo"
    assert result.version.data_counts["reward_pairs"] == sampled
    assert result.metrics["heldout_examples"] > 0  # people's, as before
    # The run's row says what it trained (it began as KTO: the row used to keep that).
    store = await Store(settings.database).open()
    try:
        runs = await store.fetch("SELECT method FROM training_runs ORDER BY id")
        assert [r[0] for r in runs] == ["kto", "dpo"]
    finally:
        await store.close()
