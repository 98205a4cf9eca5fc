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

from storyengine.bench.soak import (
    Channel,
    Sample,
    SoakConfig,
    Tally,
    _soak,
    rss_mb,
    summarise,
)
from storyengine.config import Settings
from storyengine.sampling import SamplingParams
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.storage.store import Store
from storyengine.story.engine import StoryEngine
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


def test_summary_compares_medians_after_warm_up_and_at_the_end():
    config = SoakConfig(minutes=2.0, channels=1, warmup=0.25)  # 30 s; windows of 12 s
    rss = [400, 900, 950, 1000, 1300, 1010, 1020, 1030, 1040, 1500, 1050, 1060, 1070]
    samples = [Sample(10.0 * i, 10 * i, mb) for i, mb in enumerate(rss)]
    r = summarise(samples, Tally(turns=120), config, wall=120.0)
    assert r["warmed_up"] and r["warmup_s"] == 30.0 and r["warmup_turns"] == 30
    assert r["rss_after_warmup_mb"] == 1150.0  # median of 1000 and 1300 (30 s, 40 s)
    assert r["rss_final_mb"] == 1065.0  # median of 1060 and 1070 (110 s, 120 s)
    assert r["growth_after_warmup_pct"] == pytest.approx(100 * (1065 - 1150) / 1150)
    assert r["rss_peak_sampled_mb"] == 1500.0
    assert 0 < r["slope_after_warmup_mb_per_h"] < 3600  # a rise of ~70 MB in 90 s, noisy
    assert r["turns_per_s"] == pytest.approx(1.0)
    assert [s["rss_mb"] for s in r["samples"]] == rss


def test_warm_up_lasts_until_the_channels_told_stories_of_every_length():
    config = SoakConfig(minutes=2.0, channels=2, warmup=0.25)  # 30 s, or 60 turns
    rss = [400, 900, 950, 1000, 1300, 1010, 1020, 1030, 1040, 1500, 1050, 1060, 1070]
    samples = [Sample(10.0 * i, 10 * i, mb) for i, mb in enumerate(rss)]
    r = summarise(samples, Tally(turns=120), config, wall=120.0)
    assert r["warmed_up"] and r["warmup_s"] == 60.0 and r["warmup_turns"] == 60
    assert r["rss_after_warmup_mb"] == 1025.0  # median of 1020 and 1030 (60 s, 70 s)
    slow = [Sample(s.t_s, s.turns // 4, s.rss_mb) for s in samples]  # 30 turns in all
    r = summarise(slow, Tally(turns=30), config, wall=120.0)
    assert not r["warmed_up"] and r["warmup_s"] == 30.0  # figures from --warmup on


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
    config = SoakConfig(minutes=0.05, channels=3, sample_every=1, trace_top=3)
    async with _engine(tmp_path) as engine:
        r = await _soak(engine, config)
        stories = await engine.store.db.execute_fetchall("SELECT channel, status FROM stories")
    assert r["errors"] == 0, r["error_messages"]
    assert r["turns"] > 0 and r["ops"]["start_story"] >= 3
    assert len(r["samples"]) >= 3 and all(s["rss_mb"] > 0 for s in r["samples"])
    assert {c for c, _ in stories} >= {"soak-0", "soak-1", "soak-2"}
    assert sum(r["ops"].values()) > r["turns"]  # more than generations: the other operations
    assert r["rss_idle_mb"] > 0 and len(r["python_growth"]["top"]) <= 3
    assert isinstance(r["python_growth"]["net_kb"], float)


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
