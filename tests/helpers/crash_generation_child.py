"""A story turn killed at a chosen stage: `python crash_generation_child.py DB STAGE`.

Opens an engine on DB (the tiny random GPT-2), starts a story in channel "c" unless one
is running, then continues it with a line and dies with `os._exit(9)` at STAGE: no
cleanup runs, as with kill -9 or a power cut.

    line-stored   the user's line is committed, nothing generated yet
    generating    the continuation is being written (first streamed text)
    recorded      the generation record is committed, the bot's turn is not
    turn-stored   the bot's turn is committed, the call has not returned
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: `tests.helpers` from the repository root
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from storyengine.config import Settings
from storyengine.records import Author
from storyengine.sampling import SamplingParams
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.storage.store import Store
from storyengine.story.engine import StoryEngine
from tests.helpers.models import make_tiny_model


def crash() -> None:
    sys.stdout.flush()
    os._exit(9)


async def main(db: Path, stage: str) -> None:
    settings = Settings(
        db_path=db,
        adapter_dir=db.parent / "adapters",
        device="cpu",
        sampling=SamplingParams(max_new_tokens=24, seed=1),
    )
    engine = await StoryEngine(settings, generator=BatchingGenerator(make_tiny_model())).start()
    ann = Author("1", "Ann")
    if await engine.store.active_story("c") is None:
        await engine.start_story("c", "Once upon a time, a fox found a key.", author=ann)

    add_turn, record = Store.add_turn, Store.record_generation

    async def add_turn_then(self, story_id, **kwargs):  # type: ignore[no-untyped-def]
        turn = await add_turn(self, story_id, **kwargs)
        if (stage, kwargs["kind"]) in (("line-stored", "user"), ("turn-stored", "bot")):
            crash()
        return turn

    async def record_then(self, **kwargs):  # type: ignore[no-untyped-def]
        generation = await record(self, **kwargs)
        if stage == "recorded":
            crash()
        return generation

    async def progress(text: str) -> None:
        if stage == "generating":
            crash()

    Store.add_turn = add_turn_then  # type: ignore[method-assign]
    Store.record_generation = record_then  # type: ignore[method-assign]
    await engine.continue_story("c", ann, "The key opened a tiny door.", on_progress=progress)
    raise SystemExit(f"stage {stage!r} was never reached")


if __name__ == "__main__":
    asyncio.run(main(Path(sys.argv[1]), sys.argv[2]))
