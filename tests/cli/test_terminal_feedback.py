"""Feedback without Discord: 👍/👎 and picks in the terminal, and files of feedback moved
between databases (`feedback export` → `feedback import`)."""

from __future__ import annotations

import asyncio
import json

import pytest

from storyengine.errors import InvalidInput
from storyengine.learning.datasets import build_datasets, parse_import
from storyengine.records import Author
from storyengine.storage.store import Store
from tests.cli.test_cli import run_cli

ME = Author("terminal:me", "me")


async def test_rating_the_last_turn_is_a_vote_that_can_change(tiny_engine):
    engine = tiny_engine
    await engine.start_story("t", "Once upon a time, a fox.", author=ME)
    generation = await engine.rate("t", ME, liked=True)
    assert await engine.store.feedback(generation) == [("terminal:me", "👍", 1.0)]
    assert await engine.rate("t", ME, liked=False) == generation
    assert await engine.store.feedback(generation) == [("terminal:me", "👎", -1.0)]


async def test_picking_an_alternative_records_a_preference(tiny_engine):
    engine = tiny_engine
    await engine.start_story("t", "Once upon a time, a fox.", author=ME)
    await engine.retry("t", by=ME)
    first, second = await engine.alternatives("t")
    await engine.choose_alternative("t", 1, by=ME)
    assert await engine.store.preference_pairs() == [
        (first.generation_id, second.generation_id, "terminal:me", "choice")
    ]


async def test_export_then_import_gives_the_same_training_data(tiny_engine, tmp_path):
    engine = tiny_engine
    for i in range(4):
        await engine.start_story(f"s{i}", "Once upon a time, a fox.", author=ME)
        await engine.retry(f"s{i}", by=ME, seed=100 + i)  # a different text
        await engine.choose_alternative(f"s{i}", 1, by=ME)
        await engine.rate(f"s{i}", Author(f"fan{i}", "Fan"), liked=i % 2 == 0)
    exported = await build_datasets(engine.store)
    lines = [json.dumps(row) for row in exported.rows()]

    other = await Store(tmp_path / "other.db").open()
    try:
        counts = await other.import_feedback(parse_import(lines), "test")
        imported = await build_datasets(other)
    finally:
        await other.close()
    assert counts == {"pairs": 4, "labels": 4, "stories": 4}

    def content(data):
        return sorted((p.prompt, p.chosen, p.rejected) for p in data.pairs), sorted(
            (e.prompt, e.completion, e.label) for e in data.examples
        )

    assert content(imported) == content(exported)


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("not json", "line 2: not JSON"),
        ('{"type": "pair", "prompt": "p", "chosen": "c"}', "line 2: 'rejected' must be"),
        ('{"type": "kto", "prompt": "p", "completion": "c", "label": "yes"}', "'label'"),
        ('{"type": "essay"}', '"type": "pair" or "kto"'),
    ],
)
async def test_a_malformed_file_says_where_and_imports_nothing(tmp_path, line, message):
    good = json.dumps({"type": "kto", "prompt": "p", "completion": "c", "label": True})
    with pytest.raises(InvalidInput, match=message):
        parse_import([good, line])
    path = tmp_path / "bad.jsonl"
    path.write_text(good + "\n" + line + "\n", encoding="utf-8")
    result = run_cli("feedback", "import", str(path), "--db", str(tmp_path / "x.db"), cwd=tmp_path)
    assert result.returncode == 2 and "nothing was imported" in result.stderr
    store = await Store(tmp_path / "x.db").open()
    try:
        rows = await store.db.execute_fetchall("SELECT COUNT(*) FROM generations")
    finally:
        await store.close()
    assert rows[0][0] == 0


@pytest.mark.slow
def test_chat_good_bad_and_pick_reach_the_training_data(tmp_path):
    script = "\n".join(
        [
            "/start Once upon a time, a little fox lived in a wood.",
            "/good",
            "The fox found a key.",
            "/retry",
            "/pick 1",
            "/bad",
            "/quit",
        ]
    )
    result = run_cli("chat", "--db", str(tmp_path / "c.db"), stdin=script + "\n", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Noted: 👍." in result.stdout and "Noted: 👎." in result.stdout
    exported = run_cli("feedback", "export", "--db", str(tmp_path / "c.db"), cwd=tmp_path)
    rows = [json.loads(line) for line in exported.stdout.splitlines()]
    kinds = sorted({(r["type"], r.get("source")) for r in rows})
    assert ("pair", "choice") in kinds and ("kto", None) in kinds


@pytest.mark.slow
async def test_generate_serves_the_promoted_adapter_unless_told_otherwise(tmp_path, bundled_model):
    from storyengine.learning.registry import AdapterRegistry
    from tests.learning.test_adapters import lora_saver

    store = await Store(tmp_path / "g.db").open()
    registry = await AdapterRegistry(store, tmp_path / "adapters").open()
    version = await registry.register(lora_saver(bundled_model.model, 5), method="dpo")
    await registry.promote(version.version)
    await store.close()

    def generate(*more: str) -> str:
        result = run_cli(
            "generate", "Once upon a time, a little fox", "--temperature", "0",
            "--max-new-tokens", "40", "--db", str(tmp_path / "g.db"),
            "--dir", str(tmp_path / "adapters"), *more, cwd=tmp_path,
        )  # fmt: skip
        assert result.returncode == 0, result.stderr
        return result.stdout

    promoted, base, pinned = generate(), generate("--adapter", "base"), generate("--adapter", "1")
    assert promoted == pinned != base
    missing = run_cli(
        "generate", "x", "--adapter", "9", "--db", str(tmp_path / "g.db"), cwd=tmp_path
    )
    assert missing.returncode == 2 and "no adapter version 9" in missing.stderr


@pytest.mark.slow
def test_chat_saves_a_story_and_loads_it_in_another_channel(tmp_path):
    saved = tmp_path / "story.json"
    script = "\n".join(
        [
            "/start Once upon a time, a little fox lived in a wood.",
            "The fox found a key.",
            "/retry",
            "/swipe",
            "/swipe",
            "/swipe next",
            "/context",
            "/character Rusty a shy fox",
            "/keep",
            f"/export-lore {tmp_path / 'lore.json'}",
            f"/import {tmp_path / 'lore.json'}",
            f"/save {saved}",
            "/quit",
        ]
    )
    result = run_cli("chat", "--db", str(tmp_path / "c.db"), stdin=script + "\n", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "(1/2) " in result.stdout and "This is the first one." in result.stdout
    assert "(2/2) " in result.stdout
    assert "What the storyteller saw for its last reply" in result.stdout
    assert "[Premise] " in result.stdout and "[Recent turns: 2 turns]" in result.stdout
    assert "Rusty: Rusty looked" in result.stdout and "Kept lore card Rusty." in result.stdout
    assert "Imported a world info: 1 lore card(s) (Rusty)." in result.stdout
    assert json.loads(saved.read_text())["premise"].startswith("Once upon a time")
    script = f"/load {saved}\nThe fox opened a door.\n/load {tmp_path}\n/quit\n"
    result = run_cli(
        "chat",
        "--db",
        str(tmp_path / "c.db"),
        "--channel",
        "elsewhere",
        stdin=script,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stderr
    assert "(3 turns)" in result.stdout and "Cannot read" in result.stdout


async def test_chat_illustrates_a_turn_into_a_file(tmp_path):
    from tests.helpers.pictures import FakeImageService

    picture = tmp_path / "turn.png"
    script = "\n".join(
        [
            "/illustrate x.png",  # no story yet
            "/start Once upon a time, a little fox lived in a wood.",
            "/illustrate",  # no file named
            f"/illustrate {picture} 7",
            f"/illustrate {picture} 1",
            "/quit",
        ]
    )
    async with FakeImageService() as service:
        result = await asyncio.to_thread(
            run_cli,
            "chat",
            "--db",
            str(tmp_path / "c.db"),
            stdin=script + "\n",
            cwd=tmp_path,
            env={"STORY_IMAGE_URL": service.url, "STORY_IMAGE_API_KEY": "sk-secret"},
        )
    assert result.returncode == 0, result.stderr
    assert "! There is no story running here." in result.stdout
    assert "! Usage: /illustrate FILE [TURN]" in result.stdout
    assert "pick a turn from 1 to 1" in result.stdout
    assert f"Saved the picture (image/png) to {picture}." in result.stdout
    assert picture.read_bytes().startswith(b"\x89PNG")
    prompt = service.requests[-1]["prompt"]
    assert "Drawing turn 1 of 1: " + prompt in result.stdout
    assert "storybook illustration" in prompt
    assert "sk-secret" not in result.stdout + result.stderr


def test_chat_says_how_to_turn_illustrations_on(tmp_path):
    script = "/start Once upon a time, a fox.\n/illustrate x.png\n/quit\n"
    result = run_cli("chat", "--db", str(tmp_path / "c.db"), stdin=script, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Illustrations are off" in result.stdout and "STORY_IMAGE_URL" in result.stdout
