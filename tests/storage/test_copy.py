"""`storyengine db copy --to postgresql://...`: an existing SQLite database moved over."""

import asyncio
import subprocess
import sys

from storyengine.storage.interfaces import ReactionEvent
from storyengine.storage.store import Store
from tests.helpers.models import record_text
from tests.helpers.postgres import fresh_database
from tests.storage.test_shared_database import _generation


async def copy(path, url) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "storyengine", "db", "copy", "--db", str(path), "--to", url]
    return await asyncio.to_thread(
        subprocess.run, command, capture_output=True, text=True, timeout=120
    )


async def test_a_sqlite_database_is_copied_row_for_row(tmp_path):
    path = tmp_path / "old.db"
    store = await Store(path).open()
    generation = await _generation(store, "m1")
    story = (await store.active_stories())[0]
    await store.add_turn(story.id, action=1, kind="user", text="Hi.", author_id="u")
    shown = await store.add_turn(
        story.id, action=2, kind="bot", text="Once.", generation_id=generation
    )
    candidate = await record_text(store, story.id, "p", "")  # a candidate not shown
    await store.set_candidate_group([generation, candidate], shown=generation)
    await store.apply_reactions([ReactionEvent("m1", "u2", "👍", True, 1.0)])
    await store.add_player(story.id, "u", "Ann")
    await store.close()

    async with fresh_database() as url:
        result = await copy(path, url)
        assert result.returncode == 0, result.stderr
        assert "every count checked" in result.stdout
        copied = await Store(url).open()
        try:
            assert [t.text for t in await copied.active_turns(story.id)] == ["Hi.", "Once."]
            assert (await copied.turn(shown.id)).generation_id == generation
            assert [v[0] for v in await copied.feedback(generation)] == ["u2"]
            group = await copied.fetch(
                "SELECT candidate_of FROM generations WHERE id = ?", (candidate,)
            )
            assert group[0][0] == generation  # a row that refers to its own table
            # New rows go past the copied ids.
            fresh = await copied.create_story("c2", "P", genre=None, mode="solo", created_by="u")
            assert fresh.id > story.id
            again = await copy(path, url)
            assert again.returncode == 2 and "copy into an empty one" in again.stderr
        finally:
            await copied.close()
