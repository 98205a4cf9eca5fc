"""`storyengine bench soak`: channels in a closed loop against the real engine, memory
sampled over time; a failure that is not the user's makes the command fail."""

import json
import math
import os
import sqlite3
import subprocess
import sys
import time

import pytest

from storyengine.bench_soak import Channel, Sample, SoakConfig, Tally, _soak, rss_mb, summarise
from storyengine.config import Settings
from storyengine.engine import StoryEngine
from storyengine.sampling import SamplingParams
from storyengine.scheduler import BatchingGenerator
from storyengine.store import Store
from tests.conftest import make_tiny_model


def run_soak(*args: str, cwd):
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"})
    return subprocess.run(
        [sys.executable, "-m", "storyengine", "bench", "soak", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=300,
    )


def test_summary_measures_growth_from_the_end_of_warm_up():
    config = SoakConfig(minutes=1.0, warmup=0.25)  # warm-up: the first 15 s
    samples = [
        Sample(0.0, 0, 400.0),
        Sample(10.0, 5, 900.0),
        Sample(20.0, 12, 1000.0),  # the first sample after warm-up
        Sample(40.0, 30, 1030.0),
        Sample(60.0, 50, 1050.0),
    ]
    tally = Tally(turns=50, errors=0)
    r = summarise(samples, tally, config, wall=60.0)
    assert r["rss_after_warmup_mb"] == 1000.0 and r["warmup_s"] == 20.0
    assert r["rss_final_mb"] == 1050.0 and r["rss_peak_sampled_mb"] == 1050.0
    assert r["growth_after_warmup_pct"] == pytest.approx(5.0)
    # 1000, 1030, 1050 over 40 s: least squares 1.25 MB/s
    assert r["slope_after_warmup_mb_per_h"] == pytest.approx(1.25 * 3600)
    assert r["turns_per_s"] == pytest.approx(50 / 60)
    assert [s["rss_mb"] for s in r["samples"]] == [400.0, 900.0, 1000.0, 1030.0, 1050.0]


def test_options_are_checked():
    for bad in ({"minutes": 0}, {"channels": 0}, {"warmup": 1.0}, {"sample_every": 0}):
        with pytest.raises(ValueError):
            SoakConfig(**bad)  # type: ignore[arg-type]
    assert rss_mb() > 10


def _engine(tmp_path) -> StoryEngine:
    settings = Settings(
        db_path=tmp_path / "soak.db",
        adapter_dir=tmp_path / "adapters",
        sampling=SamplingParams(max_new_tokens=8),
    )
    return StoryEngine(settings, generator=BatchingGenerator(make_tiny_model()))


@pytest.mark.slow
async def test_channels_tell_stories_and_users_mistakes_are_not_errors(tmp_path):
    config = SoakConfig(minutes=0.05, channels=3, sample_every=1)
    async with _engine(tmp_path) as engine:
        r = await _soak(engine, config)
        stories = await engine.store.db.execute_fetchall("SELECT channel, status FROM stories")
    assert r["errors"] == 0, r["error_messages"]
    assert r["turns"] > 0 and r["ops"]["start_story"] >= 3
    assert len(r["samples"]) >= 3 and all(s["rss_mb"] > 0 for s in r["samples"])
    assert {c for c, _ in stories} >= {"soak-0", "soak-1", "soak-2"}
    assert sum(r["ops"].values()) > r["turns"]  # more than generations: the other operations


async def test_a_bug_counts_as_an_error_and_a_users_mistake_does_not(tmp_path):
    tally = Tally()
    async with _engine(tmp_path) as engine:
        mistaken = Channel(engine, 0, SoakConfig(), tally)
        mistaken.next_op = lambda: ("undo", mistaken.undo)  # type: ignore[method-assign]
        await mistaken.run(time.perf_counter() + 0.2)  # undo with no story: NoActiveStory
        assert tally.user_errors["NoActiveStory"] == tally.ops["undo"] > 0
        assert tally.errors == 0
        await engine.store.db.execute("DROP TABLE lore_cards")  # a bug's stand-in: every prompt
        await Channel(engine, 1, SoakConfig(), tally).run(time.perf_counter() + 0.2)
    assert tally.errors > 0 and tally.turns == 0
    assert "no such table: lore_cards" in tally.error_messages[0]
    assert len(tally.error_messages) <= 5


@pytest.mark.slow
def test_bench_soak_command_reports_memory_over_time(tmp_path):
    out = tmp_path / "soak.json"
    result = run_soak(
        "--minutes", "0.15", "--channels", "2", "--max-new-tokens", "16",
        "--sample-every", "2", "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    assert "RSS MB" in result.stdout and "growth after warm-up" in result.stdout
    r = json.loads(out.read_text())
    assert len(r["samples"]) >= 3 and r["samples"][0]["t_s"] == pytest.approx(0, abs=0.5)
    assert r["turns"] > 0 and r["errors"] == 0
    assert math.isfinite(r["growth_after_warmup_pct"])
    assert r["rss_final_mb"] == r["samples"][-1]["rss_mb"] > 100
    assert r["setup"]["channels"] == 2 and r["setup"]["model"] == "bundled:tinystories-gpt2"


@pytest.mark.slow
def test_bench_soak_exits_non_zero_when_an_operation_fails_for_a_bug(tmp_path):
    import asyncio

    db = tmp_path / "broken.db"

    async def migrate() -> None:
        await (await Store(db).open()).close()

    asyncio.run(migrate())
    with sqlite3.connect(db) as conn:
        conn.execute("DROP TABLE lore_cards")  # every story operation reads the lore
    out = tmp_path / "soak.json"
    result = run_soak(
        "--minutes", "0.05", "--channels", "2", "--max-new-tokens", "8",
        "--db", str(db), "--json", str(out), cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 1
    assert "no such table: lore_cards" in result.stderr
    r = json.loads(out.read_text())
    assert r["errors"] > 0 and r["turns"] == 0
