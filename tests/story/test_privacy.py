"""Privacy that is complete by construction: `/story my-data` holds every row that refers
to a user, and after `/story forget-me` no row outside the forget list holds their id or
name, including rows written afterwards.

The checks scan every column of every table for the user's id and name, so a new table or
column that stores users fails here until `USER_COLUMNS`, `user_data` and `forget_user`
cover it."""

from __future__ import annotations

import re

from storyengine.records import Author
from storyengine.storage.store import USER_COLUMNS
from tests.helpers.postgres import table_columns

ZOE = Author("777000111", "Zyxwvut Qrpn")
BEN = Author("202", "Ben")
PREMISE = "Once upon a time, a fox found a key."
EXPORT_SECTIONS = {  # table -> the my-data section that carries its rows
    "stories": "stories_started",
    "turns": "turns",
    "players": "round_robin_seats",
    "feedback": "reactions",
    "choices": "companion_offers",
    "preference_pairs": "preferences",
    "communities": "learning_switches",
}


async def rows_holding(engine, *needles: str) -> dict[tuple[str, str], int]:
    """(table, column) -> how many rows hold one of `needles` in that column."""
    db = engine.store.db
    found: dict[tuple[str, str], int] = {}
    for table, name in await table_columns(engine.store):
        for needle in needles:
            rows = await db.execute_fetchall(
                f'SELECT COUNT(*) FROM {table} WHERE CAST("{name}" AS TEXT) LIKE ?',
                (f"%{needle}%",),
            )
            if rows[0][0]:
                found[(table, name)] = found.get((table, name), 0) + rows[0][0]
    return found


async def tell_everything(engine, who: Author, tag: str) -> None:
    """`who` does everything that stores something about a person."""
    await engine.start_story(f"rr-{tag}", PREMISE, author=who, mode="round-robin")
    await engine.join(f"rr-{tag}", BEN)
    result = await engine.continue_story(f"rr-{tag}", who, "The fox sang a song.")
    await engine.start_story(f"ben-{tag}", PREMISE, author=BEN, mode="round-robin")
    await engine.join(f"ben-{tag}", who)
    await engine.start_story(f"comp-{tag}", PREMISE, author=who, mode="companion")
    offer = await engine.offer_choices(f"comp-{tag}", who, "I open the door.", count=2)
    await engine.choose(f"comp-{tag}", offer.id, 2, who)
    await engine.link_message(f"m-{tag}", result.generation_id)
    await engine.record_reaction(f"m-{tag}", who.id, "👍", added=True)
    await engine.set_learning(f"guild-{tag}", True, by=who.id)


def test_every_column_that_names_a_user_is_covered():
    """Columns whose name says they hold a person must be listed in USER_COLUMNS."""
    import asyncio
    import tempfile
    from pathlib import Path

    from storyengine.storage.store import Store

    async def columns() -> list[tuple[str, str]]:
        store = await Store(Path(tempfile.mkdtemp()) / "s.db").open()
        try:
            return await table_columns(store)
        finally:
            await store.close()

    personal = re.compile(r"user|author|_by$|player|member|owner", re.IGNORECASE)
    not_personal = {
        ("stories", "authors_note"),  # the "author's note": story text
        ("training_requests", "taken_by"),  # a training worker (host:pid), not a person
    }
    uncovered = [
        (table, column)
        for table, column in asyncio.run(columns())
        if personal.search(column)
        and column not in USER_COLUMNS.get(table, ())
        and (table, column) not in not_personal
    ]
    assert uncovered == []


async def test_my_data_holds_every_row_that_refers_to_the_user(tiny_engine):
    engine = tiny_engine
    await tell_everything(engine, ZOE, "a")
    held = await rows_holding(engine, ZOE.id, ZOE.name)
    assert set(held) <= {(t, c) for t, cols in USER_COLUMNS.items() for c in cols}, held
    data = await engine.export_user_data(ZOE.id)
    for table, section in EXPORT_SECTIONS.items():
        rows = await engine.store.db.execute_fetchall(
            f"SELECT COUNT(*) FROM {table} WHERE "
            + " OR ".join(f"{c} IN (?, ?)" for c in USER_COLUMNS[table]),
            (ZOE.id, ZOE.name) * len(USER_COLUMNS[table]),
        )
        assert len(data[section]) == rows[0][0] > 0, (table, section)
    assert set(EXPORT_SECTIONS) == set(USER_COLUMNS) - {"forgotten_users"}


async def test_after_forget_me_no_row_holds_the_user_not_even_later_ones(tiny_engine):
    engine = tiny_engine
    await tell_everything(engine, ZOE, "before")
    await engine.forget_user(ZOE.id)
    assert set(await rows_holding(engine, ZOE.id, ZOE.name)) == {("forgotten_users", "user_id")}

    await tell_everything(engine, ZOE, "after")  # they go on playing
    assert set(await rows_holding(engine, ZOE.id, ZOE.name)) == {("forgotten_users", "user_id")}
    # What they wrote afterwards is kept out of training, like what they wrote before.
    rows = await engine.store.db.execute_fetchall(
        "SELECT COUNT(*), SUM(train_excluded) FROM turns WHERE author_id LIKE 'forgotten:%'"
    )
    assert rows[0][0] == rows[0][1] > 0
    # Their export still finds their anonymised rows through the alias.
    data = await engine.export_user_data(ZOE.id)
    assert data["forgotten"] and data["turns"] and data["stories_started"]
    assert data["reactions"] == [] and data["preferences"] == []
