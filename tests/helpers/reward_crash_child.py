"""A process that dies at a chosen step of registering and promoting a reward model, or
of a whole learning round's reward step: `os._exit(9)` right there, as with kill -9 or a
power cut (see crash_child.py, which does the same for adapters). The tests in
test_reward_crash.py start it, then open the same files.

    python tests/helpers/reward_crash_child.py registry STEP DB REWARD_DIR ADAPTER_DIR
    python tests/helpers/reward_crash_child.py round STEP DB REWARD_DIR ADAPTER_DIR MODEL_DIR

STEP is where it dies:
  writing    while the reward model's files are being written (its temporary directory)
  renamed    right after the version directory is renamed into place, before its row
  inserted   after the row is inserted, before the version is promoted
  promoting  inside the promotion's transaction: the old version retired, the new one
             not yet promoted, nothing committed
  promoted   right after the promotion (in a round: before the adapter is trained)
"""

from __future__ import annotations

import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `tests.helpers` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storyengine.learning import reward
from storyengine.learning.registry import round_lock
from storyengine.learning.reward import HEAD_FILE, SPEC_FILE, TEMPORARY, RewardRegistry
from storyengine.storage.store import Store
from tests.helpers.crash_points import die, die_after, inject, run_child, run_round_to_crash


def fake_reward_model(directory: Path, *, die_midway: bool = False) -> None:
    """A reward model's two files; the registry treats their content as opaque."""
    (directory / HEAD_FILE).write_bytes(b"head " * 256)
    if die_midway:
        die()
    (directory / SPEC_FILE).write_text("{}", encoding="utf-8")


async def registry_steps(step: str, db: Path, root: Path, lock_dir: Path) -> None:
    store = await Store(db).open()
    with round_lock(lock_dir):
        registry = await RewardRegistry(store, root, lock_dir=lock_dir).open(locked=True)
        version = await registry.register(
            lambda d: fake_reward_model(d, die_midway=step == "writing")
        )
        await registry.promote(version.version)


async def round_steps(step: str, db: Path, root: Path, lock_dir: Path, model_dir: Path) -> None:
    from storyengine.config import Settings

    if step == "writing":  # the files are written, the directory not yet renamed
        die_after(reward.RewardModel, "save")
    settings = Settings(db_path=db, adapter_dir=lock_dir, base_model=str(model_dir), device="cpu")
    assert reward.reward_dir(settings) == root
    await run_round_to_crash(settings)


def inject_reward_models(step: str) -> None:
    inject(step, RewardRegistry, temporary=TEMPORARY, table="reward_models")


if __name__ == "__main__":
    run_child(sys.argv[1:], inject_reward_models, registry_steps, round_steps)
