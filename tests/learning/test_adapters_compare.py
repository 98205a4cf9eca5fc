"""`storyengine adapters compare A B`: two versions (or the base model) continue the same
prompts with the same seeds, each continuation scored by the promoted reward model; and
what a round keeps of its gate samples."""

from __future__ import annotations

import pytest

from storyengine.config import Settings
from storyengine.errors import InvalidInput
from storyengine.learning.compare import compare_adapters, default_prompts
from storyengine.learning.registry import AdapterRegistry
from storyengine.learning.reward import RewardModel, RewardRegistry, reward_dir
from storyengine.storage.store import Store
from tests.cli.test_cli import run_cli
from tests.learning.test_adapters import lora_saver
from tests.learning.test_reward import CAT, PROMPT, cat_world

PROMPTS = ["Once upon a time, a little fox", "Tom had a big red kite."]


@pytest.fixture
async def two_versions(tmp_path, bundled_model) -> Settings:
    settings = Settings(device="cpu", db_path=tmp_path / "c.db", adapter_dir=tmp_path / "adapters")
    store = await Store(settings.database).open()
    registry = await AdapterRegistry(store, settings.adapter_dir).open()
    for seed in (5, 6):
        await registry.register(lora_saver(bundled_model.model, seed), method="dpo")
    await store.close()
    return settings


async def test_the_same_seed_for_both_sides_and_no_scores_without_a_reward_model(two_versions):
    settings = two_versions
    same = await compare_adapters(settings, "base", "base", prompts=PROMPTS, max_new_tokens=16)
    assert same.texts_a == same.texts_b  # one seed per prompt, whichever side
    assert same.scores_a is None and same.reward is None
    one = await compare_adapters(settings, "v1", "base", prompts=PROMPTS, max_new_tokens=16)
    assert one.texts_b == same.texts_b and one.texts_a != one.texts_b
    text = "\n".join(one.lines())
    assert "[1] Once upon a time, a little fox" in text and "  v1:" in text
    assert "  base model:" in text and "no reward model is promoted" in text


async def test_scores_come_from_the_promoted_reward_model_reading_the_base_model(
    two_versions, bundled_model
):
    settings = two_versions
    store = await Store(settings.database).open()
    rewards = await RewardRegistry(store, reward_dir(settings)).open()
    scorer = RewardModel.train(bundled_model, cat_world(8, seed=3))
    await rewards.promote((await rewards.register(scorer.save)).version)
    await store.close()

    found = await compare_adapters(settings, "1", "2", prompts=[PROMPT], max_new_tokens=16)
    assert found.reward == "r1"
    # The adapters loaded for writing do not change what the reward model reads.
    assert found.scores_a == pytest.approx(scorer.score([PROMPT], found.texts_a), abs=1e-4)
    assert found.scores_b == pytest.approx(scorer.score([PROMPT], found.texts_b), abs=1e-4)
    assert "scored higher on" in "\n".join(found.lines())
    liked = scorer.score([PROMPT, PROMPT], [CAT[0], "She went home and slept."])
    assert liked[0] > liked[1]  # the scorer is a real one, not a constant


async def test_bad_versions_say_what_is_wrong(two_versions, tmp_path):
    settings = two_versions
    with pytest.raises(InvalidInput, match="no adapter version 7"):
        await compare_adapters(settings, "7", "base", prompts=PROMPTS)
    with pytest.raises(InvalidInput, match="version numbers or base"):
        await compare_adapters(settings, "latest", "base", prompts=PROMPTS)
    result = run_cli(
        "adapters", "compare", "1", "9", "--db", str(settings.database),
        "--dir", str(settings.adapter_dir), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 2 and "no adapter version 9" in result.stderr
    missing = run_cli(
        "adapters", "compare", "1", "2", "--db", str(tmp_path / "none.db"), cwd=tmp_path
    )
    assert missing.returncode == 2 and "does not exist" in missing.stderr
    assert not (tmp_path / "none.db").exists()


def test_default_prompts_are_held_out_story_openings():
    prompts = default_prompts(3)
    assert len(prompts) == 3 and all(p.strip() for p in prompts)
