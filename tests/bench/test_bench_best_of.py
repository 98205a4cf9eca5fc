"""`storyengine bench serve --best-of N`, run small: a third run beside the others."""

import json
import os
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args, cwd):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    environment.update({"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    return subprocess.run(
        [sys.executable, "-m", "storyengine", *args],
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=300,
    )


def test_best_of_is_reported_beside_the_scheduler(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        *("bench", "serve", "--concurrency", "2", "--requests", "4", "--max-new-tokens", "6"),
        *("--best-of", "3", "--json", str(out)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "best-of-3" in result.stdout
    figures = json.loads(out.read_text())
    best = figures["best_of"]
    assert best["n"] == 3
    assert {"tokens_per_s", "ttft_p95_s", "latency_p95_s"} <= best.keys()
    # One greedy request stays single; three sampling ones write three candidates each.
    assert best["tokens"] == 6 + 3 * 3 * 6
    # Each prompt was prefilled once, as in the scheduler's run.
    assert best["prefilled_tokens"] == figures["scheduler"]["prefilled_tokens"]
    assert figures["setup"]["best_of"] == 3


def test_best_of_must_be_a_small_positive_number(tmp_path):
    result = run_cli("bench", "serve", "--best-of", "0", cwd=tmp_path)
    assert result.returncode == 2 and "--best-of" in result.stderr


def test_remote_runs_the_workload_over_http(tmp_path):
    """`--remote` (no URL): a service started here on the same model; its greedy
    outputs are the scheduler's, token for token, adapters included."""
    out = tmp_path / "bench.json"
    result = run_cli(
        *("bench", "serve", "--concurrency", "3", "--requests", "6", "--max-new-tokens", "6"),
        *("--remote", "--json", str(out)),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "over HTTP" in result.stdout
    figures = json.loads(out.read_text())
    remote = figures["remote"]
    assert remote["url"] == "local" and remote["tokens"] == 6 * 6
    assert remote["greedy_identical"] == "2/2"  # requests 0 and 4 are greedy
    assert remote["throughput_ratio"] > 0
