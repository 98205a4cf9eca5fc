"""A real crash (a child process that `os._exit`s, see crash_child.py) at each step of
registering and promoting an adapter, and of a learning round: the next round on the
same files runs, and the registry is consistent (nothing in the way of the next
version, the promoted adapter intact, at most one promoted)."""

import asyncio
import os
import signal
import sqlite3
import sys

import pytest

from storyengine.config import Settings
from storyengine.learning.registry import AdapterRegistry
from storyengine.learning.rounds import RoundConfig, run_round
from storyengine.learning.training import TrainConfig
from storyengine.storage.store import Store
from tests.helpers.crash_child import fake_adapter
from tests.helpers.crash_points import STEPS, Layout, crash, files, round_config, save_tiny_model
from tests.learning.test_rounds import make_feedback

ADAPTERS = Layout(temporary=".tmp-", marker="adapter_config.json")
"""At most one adapter promoted (whatever its lineage)."""


@pytest.mark.parametrize("step", STEPS)
async def test_a_crash_at_any_step_of_registering_leaves_a_registry_the_next_round_can_use(
    tmp_path, step
):
    db, root = tmp_path / "s.db", tmp_path / "adapters"
    store = await Store(db).open()
    registry = await AdapterRegistry(store, root).open()
    served = await registry.promote((await registry.register(fake_adapter, method="kto")).version)
    served_files = files(served.path)
    await store.close()

    await crash("crash_child.py", "registry", step, str(db), str(root))

    # The next round opens the registry on the same files (with no feedback, it then
    # skips; before, a crash after the rename made every later round fail).
    settings = Settings(db_path=db, adapter_dir=root, device="cpu")
    result = await run_round(settings, RoundConfig(), say=lambda line: None)
    assert result.status == "skipped" and result.reason.startswith("not enough feedback yet")

    store = await Store(db).open()
    registry = AdapterRegistry(store, root)
    await ADAPTERS.check_recovered(
        registry,
        step,
        served,
        served_files,
        register=lambda: registry.register(fake_adapter, method="dpo"),
    )
    await store.close()


@pytest.fixture
def tiny_model_dir(tmp_path):
    return save_tiny_model(tmp_path / "tiny-gpt2")


@pytest.mark.slow
async def test_a_round_killed_between_renaming_its_adapter_and_registering_it(
    tmp_path, tiny_model_dir
):
    """The reported failure: the version directory in place without its row made every
    later round fail with 'Directory not empty'."""
    db, root = tmp_path / "s.db", tmp_path / "adapters"
    await make_feedback(db, stories=20)
    await crash("crash_child.py", "round", "renamed", str(db), str(root), str(tiny_model_dir))
    assert (root / "v0001").is_dir()

    settings = Settings(db_path=db, adapter_dir=root, base_model=str(tiny_model_dir), device="cpu")
    result = await run_round(settings, round_config(), say=lambda line: None)
    assert result.status == "promoted" and result.version.version == 1
    (orphan,) = (root / "orphaned").iterdir()  # the killed round's adapter, kept aside
    assert orphan.name.startswith("v0001-")
    store = await Store(db).open()
    await ADAPTERS.check(AdapterRegistry(store, root))
    await store.close()
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT status, error, version FROM training_runs ORDER BY id")
        assert runs.fetchall() == [("failed", "interrupted", None), ("done", None, 1)]


@pytest.mark.slow
async def test_a_round_killed_after_promoting_keeps_its_data_window(tmp_path, tiny_model_dir):
    """Killed after the promotion, before the run was recorded as finished: the new
    adapter is served, and the next round knows which feedback it has learned from
    (it does not train on the same feedback again)."""
    db, root = tmp_path / "s.db", tmp_path / "adapters"
    await make_feedback(db, stories=20)
    await crash("crash_child.py", "round", "promoted", str(db), str(root), str(tiny_model_dir))
    with sqlite3.connect(db) as conn:
        newest = conn.execute("SELECT MAX(id) FROM generations").fetchone()[0]
        run = conn.execute("SELECT status, version, data_until FROM training_runs").fetchall()
        assert run == [("running", 1, newest)]

    settings = Settings(db_path=db, adapter_dir=root, base_model=str(tiny_model_dir), device="cpu")
    result = await run_round(settings, round_config(), say=lambda line: None)
    assert result.status == "skipped"
    assert result.reason.startswith("not enough feedback yet: 0 training examples"), result
    store = await Store(db).open()
    registry = AdapterRegistry(store, root)
    await ADAPTERS.check(registry)
    assert (await registry.promoted()).version == 1
    await store.close()
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT status, error, version FROM training_runs ORDER BY id")
        assert runs.fetchall() == [("failed", "interrupted", 1), ("done", result.reason, None)]


@pytest.mark.slow
async def test_sigterm_ends_a_training_round_at_once_and_the_next_round_runs(
    tmp_path, tiny_model_dir
):
    """What the bot's shutdown (and the parent-death signal) sends: the round stops
    mid-training within seconds, and leaves nothing the next round trips over."""
    db, root = tmp_path / "s.db", tmp_path / "adapters"
    await make_feedback(db, stories=20)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    env.update(
        STORY_DB_PATH=str(db),
        STORY_ADAPTER_DIR=str(root),
        STORY_BASE_MODEL=str(tiny_model_dir),
        STORY_DEVICE="cpu",
    )
    process = await asyncio.create_subprocess_exec(
        *[sys.executable, "-m", "storyengine", "train", "round", "--method", "kto"],
        *["--epochs", "1000", "--lr", "1e-6", "--min-examples", "4"],
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
    )
    line = ""
    while not line.startswith("step "):  # training steps are being taken
        line = (await process.stdout.readline()).decode()
        assert line, "the round ended before training"
    process.send_signal(signal.SIGTERM)
    await asyncio.wait_for(process.wait(), 5)
    assert process.returncode == -signal.SIGTERM

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT status FROM training_runs").fetchall() == [("running",)]
        assert conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
    assert not [p for p in root.iterdir() if p.name != "logs" and p.name != ".round.lock"]

    # The next round takes the lock, notes the interrupted run, and goes on (here it
    # asks for more feedback than there is, to stay short).
    settings = Settings(db_path=db, adapter_dir=root, base_model=str(tiny_model_dir), device="cpu")
    config = RoundConfig(train=TrainConfig(min_examples=1000))
    result = await run_round(settings, config, say=lambda line: None)
    assert result.status == "skipped"
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT status, error FROM training_runs ORDER BY id").fetchall()
    assert runs == [("failed", "interrupted"), ("done", result.reason)]
