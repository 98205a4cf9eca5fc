"""Cards and lorebooks in and out: SillyTavern V2 cards (JSON, PNG), world info, NovelAI."""

from __future__ import annotations

import base64
import json
import struct
import zlib

import pytest

from storyengine.errors import InvalidInput
from storyengine.records import Author
from storyengine.story.lorebooks import read, world_info

ANN = Author("u1", "Ann")
PREMISE = "Once upon a time, a little fox lived at the edge of a big wood."

CARD = {
    "spec": "chara_card_v2",
    "spec_version": "2.0",
    "data": {
        "name": "Rusty",
        "description": "A red fox with a torn ear. He is shy with strangers.",
        "personality": "Shy, curious, loyal.",
        "scenario": "Rusty lives by the river and fears the water.",
        "first_mes": "Rusty peeks out of his den.",
        "mes_example": "",
        "tags": ["fox"],
        "extensions": {"anything": {"at": "all"}},
        "character_book": {
            "entries": [
                {
                    "keys": ["river", "water"],
                    "content": "The river is wide and cold.",
                    "name": "The river",
                    "enabled": True,
                    "insertion_order": 1,
                },
                {"keys": ["den"], "content": "A hole under an oak.", "enabled": False},
            ]
        },
    },
}

WORLD_INFO = {
    "entries": {
        "0": {
            "uid": 0,
            "key": ["owl", "Hoot"],
            "comment": "Hoot",
            "content": "A wise owl.",
            "disable": False,
            "order": 100,
        },
        "1": {"uid": 1, "key": ["oak"], "comment": "", "content": "The oldest tree. " * 40},
    }
}

NOVELAI = {
    "lorebookVersion": 5,
    "entries": [
        {
            "displayName": "Mia",
            "keys": ["mia"],
            "text": "A girl who loves kites.",
            "enabled": True,
            "contextConfig": {"budgetPriority": 400},
        },
    ],
    "categories": [],
}


def png_with(chunks: list[tuple[bytes, bytes]]) -> bytes:
    """A 1x1 PNG with extra chunks, as SillyTavern writes a card."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", 1, 1, 8, 2, 0, 0, 0)
    pixels = zlib.compress(b"\x00\xff\x00\x00")
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + b"".join(chunk(k, b) for k, b in chunks)
        + chunk(b"IDAT", pixels)
        + chunk(b"IEND", b"")
    )


def card_png(card: dict) -> bytes:
    return png_with([(b"tEXt", b"chara\x00" + base64.b64encode(json.dumps(card).encode()))])


def test_a_v2_card_gives_lore_and_memory_from_json_or_png():
    for raw in (json.dumps(CARD).encode(), card_png(CARD)):
        found = read(raw)
        assert found.kind == "character card"
        assert [(c.name, c.triggers) for c in found.cards] == [
            ("Rusty", ("Rusty",)),
            ("The river", ("river", "water")),
        ]
        assert found.memory == "Shy, curious, loyal.\nRusty lives by the river and fears the water."
        assert found.skipped == 1  # the disabled entry


def test_world_info_and_novelai_lorebooks():
    found = read(json.dumps(WORLD_INFO).encode())
    assert found.kind == "world info"
    assert [c.name for c in found.cards] == ["Hoot", "oak"]
    assert len(found.cards[1].text) <= 400 and found.shortened == 1
    novel = read(json.dumps(NOVELAI).encode())
    assert novel.kind == "NovelAI lorebook"
    assert [(c.name, c.triggers, c.text) for c in novel.cards] == [
        ("Mia", ("mia",), "A girl who loves kites.")
    ]


@pytest.mark.parametrize(
    "raw, message",
    [
        (b'{"entries": ', "not JSON"),
        (b"[]", "expected a JSON object"),
        (b'{"name": "x"}', "not a SillyTavern character card"),
        (json.dumps({"spec": "chara_card_v2", "data": "x"}).encode(), '"data": expected an object'),
        (json.dumps({"spec": "chara_card_v2", "data": {"name": ""}}).encode(), '"data.name"'),
        (json.dumps({"entries": 5}).encode(), '"entries": expected a list or an object'),
        (
            json.dumps({"entries": [{"keys": 3, "text": "x"}], "lorebookVersion": 1}).encode(),
            '"entries[0].keys": expected a list of words',
        ),
        (
            json.dumps({"entries": {"0": {"key": ["a"], "content": 7}}}).encode(),
            "\"entries['0'].content\": expected a text",
        ),
        (png_with([(b"tEXt", b"Comment\x00hello")]), 'no "chara" text chunk'),
        (card_png(CARD)[:60], 'no "chara" text chunk'),
    ],
)
def test_malformed_files_say_what_is_wrong(raw, message):
    with pytest.raises(InvalidInput, match=message.replace("[", r"\[").replace("]", r"\]")):
        read(raw)


async def test_import_then_export_then_import_gives_the_same_cards(tiny_engine):
    engine = tiny_engine
    await engine.start_story("c1", PREMISE, author=ANN)
    report = await engine.import_lore("c1", card_png(CARD), by=ANN)
    assert report.cards == ["Rusty", "The river"] and report.memory_set
    story = await engine.active_story("c1")
    assert story.memory.startswith("Shy, curious, loyal.")
    await engine.import_lore("c1", json.dumps(WORLD_INFO).encode(), by=ANN)
    before = [(c.name, c.triggers, c.text) for c in await engine.lore("c1")]
    assert len(before) == 4

    exported = await engine.lore_as_world_info("c1")
    await engine.start_story("c2", PREMISE, author=ANN)
    again = await engine.import_lore("c2", exported.encode(), by=ANN)
    assert again.kind == "world info" and not again.memory_set
    assert [(c.name, c.triggers, c.text) for c in await engine.lore("c2")] == before
    assert json.loads(exported) == json.loads(world_info(await engine.lore("c2")))


async def test_a_bad_file_changes_nothing(tiny_engine):
    engine = tiny_engine
    await engine.start_story("c1", PREMISE, author=ANN)
    await engine.add_lore("c1", "Moon", "moon", "It glows.", by=ANN)
    entries = [{"keys": [f"k{i}"], "content": "x", "name": f"n{i}"} for i in range(60)]
    too_many = {"entries": entries}
    for raw in (json.dumps(too_many).encode(), b'{"entries": [', card_png(CARD)[:80]):
        with pytest.raises(InvalidInput):
            await engine.import_lore("c1", raw, by=ANN)
    assert [c.name for c in await engine.lore("c1")] == ["Moon"]
    assert (await engine.active_story("c1")).memory == ""


async def test_a_card_with_a_greeting_starts_a_story_where_none_runs(tiny_engine):
    engine = tiny_engine
    card = json.loads(json.dumps(CARD))
    card["data"]["first_mes"] = "{{char}} peeks out at {{user}}."
    card["data"]["scenario"] = "{{char}} lives by the river."
    report = await engine.import_lore("c9", json.dumps(card).encode(), by=ANN)
    assert report.started and report.describe().startswith("Started a story from a character")
    view = await engine.view("c9")
    assert view.story.premise == "Rusty lives by the river."
    assert [t.text for t in view.turns] == ["Rusty peeks out at Ann."]
    assert [c.name for c in view.lore] == ["Rusty", "The river"]
    await engine.continue_story("c9", ANN, "Ann waves.")  # and it goes on
    # With a story running, the same card only adds its lore.
    again = await engine.import_lore("c9", json.dumps(card).encode(), by=ANN)
    assert not again.started and again.memory_kept
