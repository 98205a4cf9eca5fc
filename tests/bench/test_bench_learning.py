"""`storyengine bench learning`, run small: the loop runs end to end and reports."""

import asyncio
import json
import os
import sys

import pytest

from storyengine.bench.learning import story_prompts
from storyengine.learning.audience import likes_animals, likes_cheerful, load_taste


def test_tastes_and_prompts():
    assert likes_animals("The little cat ran home.", prompt="p") is True
    assert likes_animals("Tom went home.", prompt="p") is False
    assert likes_animals("go go go go go go go go go", prompt="p") is False  # repetitive
    assert likes_animals("", prompt="p") is None
    assert likes_cheerful("She smiled.", prompt="p") is True
    assert load_taste("storyengine.learning.audience:likes_cheerful") is likes_cheerful
    with pytest.raises(ValueError):
        load_taste("storyengine.learning.audience")
    prompts = story_prompts()
    assert len(prompts) == len(set(prompts)) > 500
    assert not any(likes_animals(p) for p in prompts)  # the prompts name no animal


async def run_bench(tmp_path, out, *options: str) -> str:
    """`storyengine bench learning OPTIONS --json OUT` in a subprocess, without the
    caller's STORY_ settings; its stdout (it must exit 0)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storyengine",
        "bench",
        "learning",
        *options,
        "--json",
        str(out),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=tmp_path,
    )
    stdout, stderr = await process.communicate()
    assert process.returncode == 0, stderr.decode()[-2000:]
    return stdout.decode()


@pytest.mark.slow
async def test_bench_learning_runs_a_round_and_writes_json(tmp_path):
    out = tmp_path / "learning.json"
    options = ("--rounds", "1", "--reactions", "40", "--eval-samples", "16")
    printed = await run_bench(tmp_path, out, *options, "--max-new-tokens", "24")
    assert "approval" in printed
    rounds = json.loads(out.read_text())["rounds"]
    assert [r["round"] for r in rounds] == [0, 1]
    for r in rounds:
        assert {"approval", "perplexity", "distinct2", "repeat4", "promoted", "seconds"} <= r.keys()
        assert 0.0 <= r["approval"] <= 1.0 and r["perplexity"] > 1.0
    assert rounds[0]["promoted"] is False


@pytest.mark.slow
async def test_bench_learning_with_two_communities_reports_both_arms(tmp_path):
    """`--communities A,B`: each community's own lineage and the shared arm, round by
    round, in the JSON the issue asked for (its adapters' candidates are written at
    once and ranked through one memo of features)."""
    out = tmp_path / "communities.json"
    options = ("--communities", "animals,gloomy", "--rounds", "1", "--reactions", "24")
    small = ("--eval-samples", "8", "--max-new-tokens", "16", "--best-of", "2")
    printed = await run_bench(tmp_path, out, *options, *small)
    assert "animals (own) round 1" in printed and "gloomy (shared) round 1" in printed
    results = json.loads(out.read_text())
    assert sorted(results) == ["communities", "shared"]
    for arm in ("communities", "shared"):
        assert sorted(results[arm]) == ["animals", "gloomy"]
        for taste in ("animals", "gloomy"):
            rows = results[arm][taste]["rounds"]
            assert [r["round"] for r in rows] == [0, 1]
            for r in rows:
                assert {"approval", "approval_adapter_only", "approval_best_of_only"} <= r.keys()
                assert r["votes"] > 0 and r["perplexity"] > 1.0
    # Before any round, every arm serves the base model: the same figures.
    zero = {
        (arm, taste): results[arm][taste]["rounds"][0]["perplexity"]
        for arm in ("communities", "shared")
        for taste in ("animals", "gloomy")
    }
    assert len(set(zero.values())) == 1
