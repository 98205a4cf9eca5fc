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

import asyncio
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `tests.helpers` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storyengine.learning import reward
from storyengine.learning.registry import round_lock
from storyengine.learning.reward import HEAD_FILE, SPEC_FILE, TEMPORARY, RewardRegistry
from storyengine.storage.store import Store

STEPS = ("writing", "renamed", "inserted", "promoting", "promoted")


def die() -> None:
    os._exit(9)


def inject(step: str) -> None:
    """Patch the code at `step` to die there."""
    if step == "renamed":
        replace = os.replace

        def replace_then_die(src, dst, *args, **kwargs):
            replace(src, dst, *args, **kwargs)
            if Path(src).name.startswith(TEMPORARY):
                die()

        reward.os.replace = replace_then_die  # type: ignore[attr-defined]
    elif step == "inserted":

        async def die_before(self, version):
            die()

        RewardRegistry.promote = die_before  # type: ignore[method-assign]
    elif step == "promoting":
        import aiosqlite

        execute = aiosqlite.Connection.execute

        async def execute_or_die(self, sql, *args, **kwargs):
            if sql.startswith("UPDATE reward_models SET status = 'promoted'"):
                die()  # the UPDATE that retired the old version is not committed
            return await execute(self, sql, *args, **kwargs)

        aiosqlite.Connection.execute = execute_or_die  # type: ignore[method-assign]
    elif step == "promoted":
        promote = RewardRegistry.promote

        async def promote_then_die(self, version):
            await promote(self, version)
            die()

        RewardRegistry.promote = promote_then_die  # type: ignore[method-assign]


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
    from storyengine.learning.rounds import run_round
    from tests.helpers.crash_child import round_config

    if step == "writing":
        save = reward.RewardModel.save

        def save_then_die(self, directory):
            save(self, directory)
            die()  # the files are written, the directory not yet renamed

        reward.RewardModel.save = save_then_die  # type: ignore[method-assign]
    settings = Settings(db_path=db, adapter_dir=lock_dir, base_model=str(model_dir), device="cpu")
    assert reward.reward_dir(settings) == root
    await run_round(settings, round_config(), say=lambda line: print(line, flush=True))


def main(argv: list[str]) -> None:
    kind, step, db, root, lock_dir = argv[:5]
    if step not in STEPS:
        raise SystemExit(f"unknown step {step!r}; one of {', '.join(STEPS)}")
    inject(step)
    if kind == "registry":
        asyncio.run(registry_steps(step, Path(db), Path(root), Path(lock_dir)))
    else:
        asyncio.run(round_steps(step, Path(db), Path(root), Path(lock_dir), Path(argv[5])))
    print(f"finished without reaching the crash point {step!r}", file=sys.stderr)


if __name__ == "__main__":
    main(sys.argv[1:])
