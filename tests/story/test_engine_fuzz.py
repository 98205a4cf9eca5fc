"""Property-based fuzzing of the engine's API: any sequence of calls with any input
(lone surrogates, NUL and control characters, 100 KB strings, extreme numbers, ids of
every shape) either works or raises a `StoryError` whose message fits in a Discord
message, and leaves a database that is intact and holds only clean text."""

from __future__ import annotations

import asyncio
import itertools
import os
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from storyengine.config import Settings
from storyengine.errors import StoryError
from storyengine.records import Author
from storyengine.sampling import SamplingParams
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.story.engine import StoryEngine
from tests.helpers.models import make_tiny_model

hostile_text = st.one_of(
    st.text(max_size=60),
    st.text(alphabet=st.characters(codec=None, min_codepoint=0, max_codepoint=0x10FFFF)),
    st.sampled_from(
        ["\ud800", "\x00", "@everyone", "<@1>", "<|endoftext|>", "x" * 100_000, "", "  "]
    ),
    st.just("Once upon a time, a fox found a key."),
)
hostile_number = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0.0, 1e-38, 5e-324, 0.5, 2.0, 1e308]),
)
hostile_int = st.one_of(st.integers(), st.sampled_from([0, 1, 2**63, 2**70, -1]))
channels = st.sampled_from(["a", "b", "\ud800", "x" * 200, ""])
people = st.builds(
    Author,
    id=st.one_of(st.sampled_from(["1", "2", "3"]), st.text(max_size=120)),
    name=hostile_text,
    moderator=st.booleans(),
)

calls = st.one_of(
    st.tuples(
        st.just("start_story"),
        channels,
        hostile_text,
        st.fixed_dictionaries(
            {
                "author": people,
                "genre": st.one_of(st.none(), hostile_text),
                "mode": st.sampled_from(["solo", "round-robin", "companion", "\x00"]),
            }
        ),
    ),
    st.tuples(
        st.just("continue_story"),
        channels,
        people,
        st.fixed_dictionaries(
            {"text": st.one_of(st.none(), hostile_text)},
            optional={"temperature": hostile_number, "max_new_tokens": hostile_int},
        ),
    ),
    st.tuples(st.just("retry"), channels, st.fixed_dictionaries({"by": people})),
    st.tuples(st.just("undo"), channels, st.fixed_dictionaries({"by": people})),
    st.tuples(st.just("set_memory"), channels, hostile_text, st.fixed_dictionaries({"by": people})),
    st.tuples(
        st.just("set_authors_note"), channels, hostile_text, st.fixed_dictionaries({"by": people})
    ),
    st.tuples(
        st.just("add_lore"),
        channels,
        hostile_text,
        st.one_of(hostile_text, st.lists(hostile_text, max_size=200)),
        hostile_text,
        st.fixed_dictionaries({"by": people}),
    ),
    st.tuples(
        st.just("remove_lore"), channels, hostile_text, st.fixed_dictionaries({"by": people})
    ),
    st.tuples(
        st.just("configure_channel"),
        channels,
        st.fixed_dictionaries(
            {"by": people},
            optional={
                "preset_name": hostile_text,
                "temperature": hostile_number,
                "max_new_tokens": hostile_int,
                "top_p": hostile_number,
                "not_a_setting": hostile_number,
            },
        ),
    ),
    st.tuples(st.just("set_turn_timeout"), channels, hostile_int),
    st.tuples(st.just("choose_alternative"), channels, hostile_int),
    st.tuples(st.just("join"), channels, people),
    st.tuples(st.just("leave"), channels, people),
    st.tuples(st.just("pass_turn"), channels, people),
    st.tuples(
        st.just("offer_choices"), channels, people, st.fixed_dictionaries({"count": hostile_int})
    ),
    st.tuples(st.just("choose"), channels, hostile_int, hostile_int, people),
    st.tuples(st.just("link_message"), hostile_text, hostile_int),
    st.tuples(
        st.just("record_reaction"),
        hostile_text,
        hostile_text,
        hostile_text,
        st.fixed_dictionaries({"added": st.booleans()}),
    ),
    st.tuples(
        st.just("set_learning"),
        hostile_text,
        st.booleans(),
        st.fixed_dictionaries({"by": st.one_of(st.none(), hostile_text)}),
    ),
    st.tuples(st.just("forget_user"), hostile_text),
    st.tuples(st.just("export_user_data"), hostile_text),
    st.tuples(st.just("end_story"), channels, st.fixed_dictionaries({"by": people})),
    st.tuples(st.just("recap"), channels),
    st.tuples(st.just("export_markdown"), channels),
    st.tuples(st.just("suggest_premise"), st.one_of(st.none(), hostile_text)),
)


@pytest.fixture(scope="module")
def fuzz_engine():
    loop = asyncio.new_event_loop()
    folder = Path(tempfile.mkdtemp())
    config = Settings(
        db_path=folder / "fuzz.db",
        adapter_dir=folder / "adapters",
        device="cpu",
        sampling=SamplingParams(max_new_tokens=6, seed=1),
    )
    engine = StoryEngine(config, generator=BatchingGenerator(make_tiny_model()))
    loop.run_until_complete(engine.start())
    yield loop, engine
    loop.run_until_complete(engine.close())
    loop.close()


_example = itertools.count()


pytestmark = pytest.mark.slow


@settings(
    max_examples=int(os.environ.get("FUZZ_EXAMPLES", "60")),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(st.lists(calls, min_size=1, max_size=12))
def test_any_sequence_of_calls_works_or_says_why(fuzz_engine, sequence):
    loop, engine = fuzz_engine
    prefix = f"e{next(_example)}-"  # each example its own channels

    async def run() -> None:
        for name, *args in sequence:
            kwargs = args.pop() if args and isinstance(args[-1], dict) else {}
            if (
                name
                not in (
                    "link_message",
                    "record_reaction",
                    "set_learning",
                    "forget_user",
                    "export_user_data",
                    "suggest_premise",
                )
                and args
            ):
                args[0] = prefix + args[0] if isinstance(args[0], str) else args[0]
            try:
                await getattr(engine, name)(*args, **kwargs)
            except StoryError as exc:
                assert 0 < len(str(exc)) <= 1900, (name, str(exc)[:200])

    loop.run_until_complete(run())
    loop.run_until_complete(check_database(engine))


async def check_database(engine: StoryEngine) -> None:
    db = engine.store.db
    assert (await db.execute_fetchall("PRAGMA integrity_check"))[0][0] == "ok"
    tables = await db.execute_fetchall(
        "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%'"
    )
    for (table,) in tables:
        for column in await db.execute_fetchall(f"PRAGMA table_info({table})"):
            rows = await db.execute_fetchall(
                f'SELECT COUNT(*) FROM {table} WHERE instr(CAST("{column[1]}" AS TEXT), char(0))'
            )
            assert rows[0][0] == 0, (table, column[1])
    # Every text reads back as valid UTF-8 (a lone surrogate would not have been stored).
    for row in await db.execute_fetchall("SELECT premise, memory, authors_note FROM stories"):
        for value in row:
            value.encode("utf-8")
