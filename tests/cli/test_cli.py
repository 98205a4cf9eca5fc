"""The `storyengine` command as a user runs it: separate processes, real pipes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def run_cli(*args: str, stdin: str = "", cwd: Path, env: dict[str, str] | None = None):
    environment = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    environment.update({"HF_HUB_OFFLINE": "1", **(env or {})})
    return subprocess.run(
        [sys.executable, "-m", "storyengine", *args],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=environment,
        timeout=300,
    )


def test_generate_prints_a_readable_continuation(tmp_path):
    result = run_cli(
        "generate",
        "Once upon a time, a little fox",
        "--seed",
        "1",
        "--max-new-tokens",
        "60",
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    text = result.stdout.strip()
    assert len(text.split()) >= 40
    assert text[-1] in ".!?\"'”"
    assert "<|endoftext|>" not in text
    assert not text.startswith("Once upon a time, a little fox")


def test_generate_rejects_bad_options_clearly(tmp_path):
    result = run_cli("generate", "Hi", "--temperature", "7", cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == "storyengine: error: temperature must be between 0 and 2"


def test_chat_session_through_a_pipe_resumes_in_a_second_run(tmp_path):
    db = tmp_path / "stories.db"
    export = tmp_path / "story.md"
    first = run_cli(
        "chat",
        "--db",
        str(db),
        "--channel",
        "den",
        "--author",
        "Ann",
        stdin="\n".join(
            [
                "/help",
                "/start Once upon a time, a little fox lived in a cosy den.",
                "The fox found a shiny key under a rock.",
                "/retry",
                "/alts",
                "/pick 1",
                "/undo",
                "/continue The fox decided to look for the door.",
                "/memory The fox is called Rusty.",
                "/note The story is funny.",
                "/lore Owl: owl, hoot: A wise old owl who lives in the oak.",
                "/lore",
                "/recap",
                f"/export {export}",
                "/bogus",
                "/quit",
            ]
        )
        + "\n",
        cwd=tmp_path,
        env={"STORY_MAX_NEW_TOKENS": "40"},
    )
    assert first.returncode == 0, first.stderr
    out = first.stdout
    assert "No story in 'den' yet." in out
    assert "/start PREMISE" in out  # help
    assert "*2." in out and " 1." in out  # two alternatives, the second active
    assert "Undone: 2 turn(s)." in out
    assert "Memory set." in out and "Author's note set." in out
    assert "Owl (owl, hoot): A wise old owl who lives in the oak." in out
    assert "Story so far (3 turns): Once upon a time, a little fox lived in a cosy den." in out
    assert "! Unknown command /bogus." in out
    markdown = export.read_text()
    assert "**Ann:** The fox decided to look for the door." in markdown
    assert "The fox found a shiny key" not in markdown  # undone

    second = run_cli(
        "chat",
        "--db",
        str(db),
        "--channel",
        "den",
        "--author",
        "Ann",
        stdin="The owl said hello to the fox.\n/export\n/end\n/continue\n",
        cwd=tmp_path,
        env={"STORY_MAX_NEW_TOKENS": "40"},
    )
    assert second.returncode == 0, second.stderr
    out = second.stdout
    assert "Resuming the story in 'den' (3 turns)." in out
    assert "**Ann:** The fox decided to look for the door." in out  # the old turns are there
    assert "**Ann:** The owl said hello to the fox." in out  # and the new one after them
    assert "The story has ended." in out
    assert "! There is no story running here." in out


def test_db_migrate_and_status(tmp_path):
    db = tmp_path / "s.db"
    # `status` on a path with no database says so, and creates nothing there.
    result = run_cli("db", "status", "--db", str(db), cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.strip() == (
        f"storyengine: error: {db.resolve()}: no database there (nothing was created); check --db,"
        " STORY_DB_PATH or STORY_DATA_DIR"
    )
    assert not db.exists()
    result = run_cli("db", "migrate", "--db", str(db), cwd=tmp_path)
    assert "applied 0001_init" in result.stdout
    result = run_cli("db", "migrate", "--db", str(db), cwd=tmp_path)
    assert "up to date" in result.stdout and "0001_init: applied" in result.stdout


def test_storyengine_imports_no_discord_and_needs_no_token(tmp_path):
    code = (
        "import sys, storyengine, storyengine.story.engine, storyengine.cli.main;"
        "import storyengine.serving.generation;"
        "assert not any(m == 'discord' or m.startswith('discord.') for m in sys.modules), 'discord'"
    )
    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    package = Path(__file__).resolve().parents[2] / "storyengine"
    for source in package.rglob("*.py"):
        for line in source.read_text().splitlines():
            stripped = line.strip()
            assert not stripped.startswith(("import discord", "from discord")), f"{source}: {line}"


def test_bench_serve_prints_and_writes_the_figures(tmp_path):
    out = tmp_path / "bench.json"
    result = run_cli(
        "bench",
        "serve",
        "--concurrency",
        "2",
        "--requests",
        "4",
        "--max-new-tokens",
        "6",
        "--json",
        str(out),
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "throughput ratio" in result.stdout and "scheduler" in result.stdout
    figures = json.loads(out.read_text())
    keys = {"tokens_per_s", "ttft_p50_s", "ttft_p95_s", "latency_p50_s", "latency_p95_s"}
    for side in ("baseline", "scheduler"):
        assert keys <= figures[side].keys()
        assert figures[side]["tokens"] == 4 * 6
    assert figures["throughput_ratio"] > 0 and figures["peak_rss_mb"] > 0
    assert figures["greedy_identical"] == "1/1"


def test_train_sft_says_what_is_wrong_with_its_input(tmp_path):
    missing = run_cli("train", "sft", "--corpus", "nowhere", "--db", "x.db", cwd=tmp_path)
    assert missing.returncode == 2
    assert missing.stderr.strip().splitlines() == [
        "storyengine: error: nowhere: no such file or folder"
    ]
    (tmp_path / "c.txt").write_text("A story.")
    bad = run_cli("train", "sft", "--corpus", "c.txt", "--lr", "5", cwd=tmp_path)
    assert bad.returncode == 2 and "--lr: must be above 0 and below 1, got 5.0" in bad.stderr
    assert "Traceback" not in missing.stderr + bad.stderr


def test_bench_learning_says_what_is_wrong_with_its_options(tmp_path):
    bad = run_cli("bench", "learning", "--reactions", "3", "--openings", "4", cwd=tmp_path)
    assert bad.returncode == 2
    assert bad.stderr.strip().splitlines() == [
        "storyengine: error: --openings must be at least 1 and at most --reactions"
    ]


def test_version_prints_the_package_version(tmp_path):
    from storyengine.version import __version__

    result = run_cli("--version", cwd=tmp_path)
    assert result.returncode == 0
    assert result.stdout.strip() == f"storyengine (taleweaver) {__version__}"
