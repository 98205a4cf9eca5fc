"""A real crash (a child process that `os._exit`s, see reward_crash_child.py) at each step
of registering and promoting a reward model, and in a round's reward step: the registry
opened again is consistent, the next version registers and promotes, and the next round
runs."""

import sqlite3

import pytest

from storyengine.config import Settings
from storyengine.learning.reward import HEAD_FILE, TEMPORARY, RewardRegistry, reward_dir
from storyengine.learning.rounds import run_round
from storyengine.storage.store import Store
from tests.helpers.crash_points import STEPS, Layout, crash, files, round_config, save_tiny_model
from tests.helpers.reward_crash_child import fake_reward_model
from tests.learning.test_rounds import make_feedback

REWARD_MODELS = Layout(temporary=TEMPORARY, marker=HEAD_FILE, lineage=lambda v: v.community)
"""At most one reward model promoted per community."""


@pytest.mark.parametrize("step", STEPS)
async def test_a_crash_at_any_step_of_registering_leaves_a_registry_that_works(tmp_path, step):
    db, adapters = tmp_path / "s.db", tmp_path / "adapters"
    root = reward_dir(Settings(adapter_dir=adapters))
    store = await Store(db).open()
    registry = await RewardRegistry(store, root, lock_dir=adapters).open()
    served = await registry.promote((await registry.register(fake_reward_model)).version)
    served_files = files(served.path)
    await store.close()

    await crash("reward_crash_child.py", "registry", step, str(db), str(root), str(adapters))

    store = await Store(db).open()
    registry = await RewardRegistry(store, root, lock_dir=adapters).open()  # sweeps
    await REWARD_MODELS.check_recovered(
        registry, step, served, served_files, register=lambda: registry.register(fake_reward_model)
    )
    await store.close()


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model(tmp_path / "tiny-gpt2")


@pytest.mark.slow
@pytest.mark.parametrize("step", ["writing", "renamed"])
async def test_a_round_killed_while_registering_its_reward_model(tmp_path, tiny_model_dir, step):
    """Killed with the reward model's files half written, or renamed into place without
    a row: the next round sweeps them away, trains and registers both models."""
    db, adapters = tmp_path / "s.db", tmp_path / "adapters"
    settings = Settings(db_path=db, adapter_dir=adapters, base_model=str(tiny_model_dir))
    root = reward_dir(settings)
    await make_feedback(db, stories=20)
    await crash(
        "reward_crash_child.py",
        "round",
        step,
        str(db),
        str(root),
        str(adapters),
        str(tiny_model_dir),
    )
    assert any(root.iterdir())  # it left something behind

    lines: list[str] = []
    result = await run_round(settings.replace(device="cpu"), round_config(), say=lines.append)
    assert result.status == "promoted", result
    assert result.metrics["reward"]["status"] == "promoted", result.metrics["reward"]
    store = await Store(db).open()
    registry = RewardRegistry(store, root, lock_dir=adapters)
    await REWARD_MODELS.check(registry)
    assert [v.status for v in await registry.list()] == ["promoted"]
    await store.close()
    orphans = list((root / "orphaned").iterdir()) if (root / "orphaned").exists() else []
    assert len(orphans) == (step == "renamed")
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT status, error FROM training_runs ORDER BY id").fetchall()
    assert runs == [("failed", "interrupted"), ("done", None)]
