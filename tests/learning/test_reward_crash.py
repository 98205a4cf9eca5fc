"""A real crash (a child process that `os._exit`s, see reward_crash_child.py) at each step
of registering and promoting a reward model, and in a round's reward step: the registry
opened again is consistent, the next version registers and promotes, and the next round
runs."""

import asyncio
import hashlib
import re
import sqlite3
import sys
from pathlib import Path

import pytest

from storyengine.config import Settings
from storyengine.learning.reward import HEAD_FILE, TEMPORARY, RewardRegistry, reward_dir
from storyengine.learning.rounds import run_round
from storyengine.storage.store import Store
from tests.helpers.crash_child import round_config
from tests.helpers.reward_crash_child import STEPS, fake_reward_model
from tests.learning.test_rounds import make_feedback

CHILD = Path(__file__).parents[1] / "helpers" / "reward_crash_child.py"
VERSION_DIR = re.compile(r"v(\d{4,})")


async def crash(*args: str) -> str:
    """Run reward_crash_child.py with `args`; it must die at its crash point (status 9)."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        str(CHILD),
        *args,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    out, _ = await process.communicate()
    assert process.returncode == 9, out.decode()
    return out.decode()


def files(path: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in path.iterdir()}


async def check_consistent(registry: RewardRegistry) -> None:
    """No leftovers where the registry looks, a row for every version directory, a
    directory for every row, at most one promoted per lineage."""
    root = registry.root
    assert not list(root.glob(TEMPORARY + "*"))
    on_disk = {int(m.group(1)) for p in root.iterdir() if (m := VERSION_DIR.fullmatch(p.name))}
    versions = await registry.list()
    assert on_disk == {v.version for v in versions}
    assert all((v.path / HEAD_FILE).is_file() for v in versions)
    lineages = [v.community for v in versions if v.status == "promoted"]
    assert len(lineages) == len(set(lineages))


@pytest.mark.parametrize("step", STEPS)
async def test_a_crash_at_any_step_of_registering_leaves_a_registry_that_works(tmp_path, step):
    db, adapters = tmp_path / "s.db", tmp_path / "adapters"
    root = reward_dir(Settings(adapter_dir=adapters))
    store = await Store(db).open()
    registry = await RewardRegistry(store, root, lock_dir=adapters).open()
    served = await registry.promote((await registry.register(fake_reward_model)).version)
    served_files = files(served.path)
    await store.close()

    await crash("registry", step, str(db), str(root), str(adapters))

    store = await Store(db).open()
    registry = await RewardRegistry(store, root, lock_dir=adapters).open()  # sweeps
    await check_consistent(registry)
    promoted = await registry.promoted()
    if step == "promoted":  # the promotion committed: r2 is used, r1 retired
        assert promoted.version == 2 and (await registry.get(1)).status == "retired"
    else:  # the promotion never happened, or rolled back whole
        assert promoted.version == 1 and files(promoted.path) == served_files
    if step == "inserted":  # a candidate stays one: it may still be promoted
        assert (await registry.get(2)).status == "candidate"
    if step == "renamed":  # the whole version without a row is kept, out of the way
        (orphan,) = (root / "orphaned").iterdir()
        assert orphan.name.startswith("v0002-") and (orphan / HEAD_FILE).is_file()

    new = await registry.register(fake_reward_model)
    assert (await registry.promote(new.version)).status == "promoted"
    await check_consistent(registry)
    assert (await registry.promoted()).version == new.version
    assert files(served.path) == served_files
    await store.close()


@pytest.fixture
def tiny_model_dir(tmp_path):
    """The tiny random GPT-2 saved as a base model a round can load."""
    from tests.helpers.models import make_tiny_model

    loaded = make_tiny_model(n_positions=1024)  # held-out stories run to 512 tokens
    path = tmp_path / "tiny-gpt2"
    loaded.model.save_pretrained(path)
    loaded.tokenizer.save_pretrained(path)
    return path


@pytest.mark.slow
@pytest.mark.parametrize("step", ["writing", "renamed"])
async def test_a_round_killed_while_registering_its_reward_model(tmp_path, tiny_model_dir, step):
    """Killed with the reward model's files half written, or renamed into place without
    a row: the next round sweeps them away, trains and registers both models."""
    db, adapters = tmp_path / "s.db", tmp_path / "adapters"
    settings = Settings(db_path=db, adapter_dir=adapters, base_model=str(tiny_model_dir))
    root = reward_dir(settings)
    await make_feedback(db, stories=20)
    await crash("round", step, str(db), str(root), str(adapters), str(tiny_model_dir))
    assert any(root.iterdir())  # it left something behind

    lines: list[str] = []
    result = await run_round(settings.replace(device="cpu"), round_config(), say=lines.append)
    assert result.status == "promoted", result
    assert result.metrics["reward"]["status"] == "promoted", result.metrics["reward"]
    store = await Store(db).open()
    registry = RewardRegistry(store, root, lock_dir=adapters)
    await check_consistent(registry)
    assert [v.status for v in await registry.list()] == ["promoted"]
    await store.close()
    orphans = list((root / "orphaned").iterdir()) if (root / "orphaned").exists() else []
    assert len(orphans) == (step == "renamed")
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT status, error FROM training_runs ORDER BY id").fetchall()
    assert runs == [("failed", "interrupted"), ("done", None)]
