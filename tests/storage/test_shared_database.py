"""Several processes on one database: each `Store` here is what one process opens (its
own connections), writing at the same time. Run on both stores; PostgreSQL is the one
several machines share."""

import asyncio

import pytest

from storyengine.storage.interfaces import ReactionEvent
from storyengine.storage.postgres import numbered
from storyengine.storage.store import Store
from tests.helpers.models import record_text


async def _generation(store: Store, message_id: str) -> int:
    """A round-robin story whose generation `message_id` shows."""
    story = await store.create_story("c", "P", genre=None, mode="round-robin", created_by="u")
    generation = await record_text(store, story.id, "p", "o")
    assert await store.link_message(message_id, generation)
    return generation


async def test_processes_reacting_to_one_message_lose_no_vote(database):
    first = await Store(database).open()
    second = await Store(database).open()  # another process's connection
    try:
        generation = await _generation(first, "m1")

        async def react(store: Store, users: range) -> None:
            for user in users:
                await store.apply_reactions([ReactionEvent("m1", f"u{user}", "👍", True, 1.0)])

        await asyncio.gather(react(first, range(0, 40)), react(second, range(40, 80)))
        votes = await first.feedback(generation)
        assert len(votes) == 80 and {v[0] for v in votes} == {f"u{n}" for n in range(80)}
    finally:
        await first.close()
        await second.close()


async def test_players_joining_from_two_processes_each_get_their_own_seat(database):
    first = await Store(database).open()
    second = await Store(database).open()
    try:
        story = await first.create_story("g", "P", genre=None, mode="round-robin", created_by="u")

        async def join(store: Store, users: range) -> None:
            for user in users:
                await store.add_player(story.id, f"u{user}", f"User {user}")

        await asyncio.gather(join(first, range(0, 10)), join(second, range(10, 20)))
        seats = [p.seat for p in await first.players(story.id)]
        assert sorted(seats) == list(range(1, 21))  # none taken twice, none skipped
    finally:
        await first.close()
        await second.close()


def test_parameters_are_numbered_for_postgresql_outside_quoted_text():
    assert numbered("SELECT ? WHERE a = '?' AND b = ?") == "SELECT $1 WHERE a = '?' AND b = $2"


async def test_a_database_that_does_not_answer_is_named_without_its_password():
    from storyengine.errors import ConfigError

    with pytest.raises(ConfigError) as info:
        await Store("postgresql://ann:s3cret@127.0.0.1:1/nowhere").open()
    assert "s3cret" not in str(info.value) and "ann:***@127.0.0.1:1" in str(info.value)


async def test_two_workers_never_take_the_same_round_request(database):
    first = await Store(database).open()
    second = await Store(database).open()
    try:
        for n in range(10):
            await first.request_round(f"due {n}", f"c{n}")

        async def drain(store: Store, name: str) -> list[int]:
            taken = []
            while (request := await store.take_round_request(name)) is not None:
                taken.append(request[0])
            return taken

        a, b = await asyncio.gather(drain(first, "a"), drain(second, "b"))
        assert sorted(a + b) == list(range(1, 11)) and not set(a) & set(b)
    finally:
        await first.close()
        await second.close()
