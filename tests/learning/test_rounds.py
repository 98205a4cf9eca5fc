"""A whole learning round on the bundled model, and what a killed round leaves behind."""

import asyncio
import json
import os
import signal
import sqlite3
import sys
from dataclasses import asdict

import pytest
from peft import PeftModel

from storyengine.config import Settings
from storyengine.learning.evaluation import perplexity
from storyengine.learning.registry import AdapterRegistry
from storyengine.learning.rounds import LOGPROBS, RoundConfig, heldout_stories, run_round
from storyengine.learning.training import TrainConfig, completion_logprobs
from storyengine.serving.modeling import load_for_training
from storyengine.storage.store import Store
from tests.helpers.models import record_text

pytestmark = pytest.mark.slow

LIKED = "The little cat found a warm, sunny spot and purred happily."
DISLIKED = "The dog barked and barked and barked at nothing at all."


async def make_feedback(db, stories: int = 30) -> None:
    store = await Store(db).open()
    for n in range(stories):
        story = await store.create_story(
            f"c{n}", "Premise.", genre=None, mode="solo", created_by="u"
        )
        prompt = f"Once upon a time, in story number {n}, there was a garden.\n"
        for text, value in ((LIKED, 1.0), (DISLIKED, -1.0)):
            g = await record_text(store, story.id, prompt, text)
            await store.set_feedback(g, f"user{n % 7}", "👍" if value > 0 else "👎", value)
    await store.close()


async def test_a_round_trains_gates_and_registers(tmp_path):
    db = tmp_path / "s.db"
    await make_feedback(db)
    settings = Settings(db_path=db, adapter_dir=tmp_path / "adapters", device="cpu")
    lines: list[str] = []
    config = RoundConfig(
        method="kto", train=TrainConfig(learning_rate=5e-4, batch_size=8, max_length=128)
    )
    result = await run_round(settings, config, say=lines.append)
    assert result.status in {"promoted", "rejected"}, result
    assert lines[0].startswith("training kto on") and "fresh adapter" in lines[0]
    assert "stops if held-out perplexity passes" in lines[0]
    metrics = result.version.metrics
    guard = metrics["train"]["guard"]
    assert guard["checks"] and all(value > 1 for _, value in guard["checks"])
    assert metrics["heldout_examples"] > 0 and metrics["perplexity"] > 0
    assert metrics["train"]["examples"] + metrics["heldout_examples"] == 60
    # The gate's perplexities are the drift guard's (the same stories): the saved
    # adapter's, measured afresh, and the base model's for the fresh LoRA it started as.
    loaded = load_for_training(settings)
    saved = PeftModel.from_pretrained(loaded.model, str(result.version.path))
    stories = heldout_stories()
    assert metrics["perplexity"] == pytest.approx(
        perplexity(saved, loaded.tokenizer, "default", stories), rel=1e-5
    )
    assert metrics["current_perplexity"] == pytest.approx(metrics["base_perplexity"], rel=1e-6)
    assert metrics["base_perplexity"] == pytest.approx(
        perplexity(saved, loaded.tokenizer, None, stories), rel=1e-5
    )
    # The candidate's log-likelihoods of the held-out feedback are remembered under its
    # files (next round's gate scores the adapter in service on them), equal to the
    # saved adapter's measured afresh; the base model's under the model.
    remembered = LOGPROBS.table(loaded, result.version.path)
    base_known = LOGPROBS.table(loaded, None)
    items = list(remembered)
    assert len(items) == metrics["heldout_examples"] and set(items) <= set(base_known)
    fresh = completion_logprobs(saved, loaded.tokenizer, items, adapter="default")
    assert [remembered[i] for i in items] == pytest.approx(fresh, rel=1e-4, abs=1e-3)
    base_fresh = completion_logprobs(saved, loaded.tokenizer, items, adapter=None)
    assert [base_known[i] for i in items] == pytest.approx(base_fresh, rel=1e-4, abs=1e-3)
    # The gate sampled from both adapters and compared their repetition.
    assert any(line.startswith("sampling 32 continuations") for line in lines)
    for key in ("repeat4", "current_repeat4", "distinct2", "current_distinct2"):
        assert 0 <= metrics[key] <= 1, key
    assert metrics["distinct2"] > 0.2  # real text, not an empty sample
    # A handful of them stay in the version's report, beside its parent's (here the base
    # model's) for the same prompts.
    kept = metrics["samples"]
    assert len(kept) == 4 and all(set(s) == {"prompt", "this", "parent"} for s in kept)
    assert any(s["this"] != s["parent"] for s in kept)
    report = json.loads((result.version.path / "taleweaver.json").read_text())
    assert report["metrics"]["samples"] == kept
    # What reproduces the version travels with it (nanoGPT's checkpoints carry their
    # config): the method's settings as trained, the base model, the data window.
    recipe = report["recipe"]
    assert recipe["base_model"] == settings.base_model
    assert recipe["train"]["method"] == "kto" and recipe["train"]["learning_rate"] == 5e-4
    assert recipe["train"]["seed"] == config.train.seed and recipe["train"]["epochs"] > 0
    assert recipe["round"]["gate"] == json.loads(json.dumps(asdict(config.gate)))
    assert recipe["data_window"] == {"after_generation": 0, "until": 60}  # 60 generations
    store = await Store(db).open()
    registry = await AdapterRegistry(store, settings.adapter_dir).open()
    versions = await registry.list()
    assert [v.version for v in versions] == [1]
    assert versions[0].status == ("promoted" if result.status == "promoted" else "rejected")
    runs = await store.db.execute_fetchall("SELECT method, status, version FROM training_runs")
    assert [tuple(r) for r in runs] == [("kto", "done", 1)]
    await store.close()


async def test_a_round_with_no_room_under_the_perplexity_bounds_is_skipped(tmp_path):
    """When the drift guard trips at its first check, even at a quarter of the learning
    rate, nothing was learned: the round says so and registers no version, instead of
    gating a copy of the served adapter."""
    db = tmp_path / "s.db"
    await make_feedback(db, stories=20)
    settings = Settings(db_path=db, adapter_dir=tmp_path / "adapters", device="cpu")
    config = RoundConfig(
        method="dpo",
        train=TrainConfig(learning_rate=5e-3, batch_size=4, max_length=128),
        drift_guard=1e-9,  # any step is too far
    )
    lines: list[str] = []
    result = await run_round(settings, config, say=lines.append)
    assert result.status == "skipped" and result.version is None
    assert "no room left under the perplexity bounds" in result.reason
    # Twice again at half the learning rate before giving up.
    retries = [line for line in lines if "went past the limit" in line]
    assert [line.rsplit(" ", 1)[1] for line in retries] == ["0.0025", "0.00125"]
    store = await Store(db).open()
    assert await store.db.execute_fetchall("SELECT * FROM adapters") == []
    await store.close()


async def test_killing_a_round_leaves_the_served_adapter_and_database_intact(tmp_path):
    db = tmp_path / "s.db"
    await make_feedback(db)
    adapters = tmp_path / "adapters"
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    env.update(STORY_DB_PATH=str(db), STORY_ADAPTER_DIR=str(adapters), STORY_DEVICE="cpu")
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storyengine",
        "train",
        "round",
        "--method",
        "kto",
        "--epochs",
        "50",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        env=env,
        cwd=tmp_path,
    )
    line = ""
    while not line.startswith("training kto"):  # past any warnings
        line = (await process.stdout.readline()).decode()
        assert line, "the round ended before training"
    await asyncio.sleep(1.5)  # training has begun; 50 epochs take far longer
    process.send_signal(signal.SIGKILL)
    await process.wait()

    with sqlite3.connect(db) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        assert conn.execute("SELECT COUNT(*) FROM adapters").fetchone()[0] == 0
        assert conn.execute("SELECT status FROM training_runs").fetchall() == [("running",)]
        assert conn.execute("SELECT COUNT(*) FROM feedback").fetchone()[0] == 60
    assert not adapters.exists() or not any(p.name.startswith("v") for p in adapters.iterdir())

    # The next round notes the interrupted one and works as usual.
    settings = Settings(db_path=db, adapter_dir=adapters, device="cpu")
    config = RoundConfig(method="kto", train=TrainConfig(max_length=128))
    result = await run_round(settings, config, say=lambda _: None)
    assert result.status in {"promoted", "rejected"}
    with sqlite3.connect(db) as conn:
        runs = conn.execute("SELECT status, error FROM training_runs ORDER BY id").fetchall()
    assert runs == [("failed", "interrupted"), ("done", result.reason or None)]


def test_round_config_says_what_is_wrong():
    with pytest.raises(ValueError, match="--drift-guard"):
        RoundConfig(drift_guard=0.0)
    with pytest.raises(ValueError, match="--guard-retries"):
        RoundConfig(guard_retries=-1)
