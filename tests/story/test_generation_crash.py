"""A story turn killed at each stage (a real process, `os._exit`): the database stays
intact, nothing committed is lost, and the story goes on."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest

from storyengine.records import Author

pytestmark = pytest.mark.slow

HERE = Path(__file__).parents[1] / "helpers"
LINE = "The key opened a tiny door."


def crash_at(db: Path, stage: str) -> None:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(HERE.parents[1])}
    result = subprocess.run(
        [sys.executable, str(HERE / "crash_generation_child.py"), str(db), stage],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 9, result.stderr[-2000:]


@pytest.mark.parametrize("stage", ["line-stored", "generating", "recorded", "turn-stored"])
async def test_a_turn_killed_at_any_stage_leaves_a_story_that_goes_on(tmp_path, stage):
    from storyengine.config import Settings
    from storyengine.sampling import SamplingParams
    from storyengine.serving.scheduler import BatchingGenerator
    from storyengine.story.engine import StoryEngine
    from tests.helpers.models import make_tiny_model

    db = tmp_path / "stories.db"
    crash_at(db, stage)
    with sqlite3.connect(db) as raw:
        assert raw.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        dangling = raw.execute(
            "SELECT COUNT(*) FROM turns t LEFT JOIN generations g ON g.id = t.generation_id"
            " WHERE t.generation_id IS NOT NULL AND g.id IS NULL"
        ).fetchone()[0]
        assert dangling == 0

    settings = Settings(
        db_path=db,
        adapter_dir=tmp_path / "adapters",
        device="cpu",
        sampling=SamplingParams(max_new_tokens=12, seed=2),
    )
    ann = Author("1", "Ann")
    async with StoryEngine(settings, generator=BatchingGenerator(make_tiny_model())) as engine:
        view = await engine.view("c")
        texts = [t.text for t in view.turns]
        assert view.story.premise == "Once upon a time, a fox found a key."
        assert view.turns[0].kind == "bot"  # the opening
        assert LINE in texts  # the line was committed before the crash: it is kept
        if stage == "turn-stored":
            assert view.turns[-1].kind == "bot"  # the reply too
        else:
            assert view.turns[-1].text == LINE  # no reply: continuing writes one
        result = await engine.continue_story("c", ann)
        assert result.text and (await engine.view("c")).turns[-1].kind == "bot"
        await engine.undo("c")
        await engine.continue_story("c", ann, "And they went home.")
