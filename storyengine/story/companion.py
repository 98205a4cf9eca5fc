"""Companion choices: the storyteller offers a few continuations written together, and
the one a person picks becomes the turn, recorded as preferred over the others.
"""

from __future__ import annotations

import asyncio
from typing import Any

from ..config import MAX_ID
from ..errors import InvalidInput
from ..records import Author, ChoiceOption, ChoiceSet, TurnResult
from ..sampling import DEFAULT_PRESET, PRESETS
from ..storage import TellingRecords, is_alias
from .games import RoundRobin
from .permissions import Action
from .stories import Stories
from .telling import Teller


class Companion:
    def __init__(self, stories: Stories, games: RoundRobin, teller: Teller) -> None:
        self.stories = stories
        self.store: TellingRecords = stories.store
        self.games = games
        self.teller = teller

    async def offer_choices(
        self,
        channel: str,
        author: Author,
        text: str | None = None,
        *,
        count: int = 3,
        **overrides: Any,
    ) -> ChoiceSet:
        """Add the author's line and write `count` alternative continuations at once
        (they are batched together); none joins the story until one is chosen."""
        if not isinstance(count, int) or not 2 <= count <= 4:
            raise InvalidInput("Offer between 2 and 4 alternatives.")
        line = self.stories.safety.clean_input(text, what="Your line", required=False)
        author = await self.stories.who(author)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, author, Action.CONTINUE)
            if story.mode == "round-robin":
                await self.games.require_turn(story, author)
            params = await self.stories.sampling_for(story.channel, **overrides)
            await self.store.expire_open_choices(story.id)
            turns, user_turn, action = await self.teller.add_user_line(story, author, line)
            if params.beam_search or params.greedy:  # alternatives need sampling
                params = PRESETS[DEFAULT_PRESET].params.replace(
                    max_new_tokens=params.max_new_tokens
                )
            base_seed = (
                params.seed if params.seed is not None else int(self.stories.clock() * 1000) % 2**31
            )
            prompt = await self.stories.prompt(story, turns, params)
            results = await asyncio.gather(
                *(
                    self.teller.writer.narrate(
                        story,
                        prompt,
                        params.replace(seed=(base_seed + 7919 * i) % 2**63),
                        echo_of=user_turn.text if user_turn else None,
                    )
                    for i in range(count)
                ),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            written = [r for r in results if not isinstance(r, BaseException)]
            generation_ids = [g for _, g in written]
            choice_id = await self.store.create_choice(story.id, action, author.id, generation_ids)
            options = tuple(ChoiceOption(i, g, n.text) for i, (n, g) in enumerate(written, 1))
            return ChoiceSet(choice_id, story, user_turn, options)

    async def choose(
        self, channel: str, choice_id: int, position: int, author: Author
    ) -> TurnResult:
        """Make option `position` of an offered choice the story's turn; the choice is
        recorded as a preference: the chosen continuation over each of the others."""
        if not isinstance(choice_id, int) or not 0 < choice_id <= MAX_ID:
            raise InvalidInput("That choice does not belong to this story.")
        author = await self.stories.who(author)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, author, Action.CHOOSE)
            found = await self.store.choice(choice_id)
            if found is None or found[0] != story.id:
                raise InvalidInput("That choice does not belong to this story.")
            _, action, status, generation_ids = found
            if not isinstance(position, int) or not 1 <= position <= len(generation_ids):
                raise InvalidInput(f"Choose an option from 1 to {len(generation_ids)}.")
            if status != "open" or not await self.store.close_choice(choice_id, "chosen"):
                raise InvalidInput("That choice is closed: the story has moved on.")
            chosen = generation_ids[position - 1]
            record = await self.store.generation(chosen)
            assert record is not None
            turn = await self.store.add_turn(
                story.id, action=action, kind="bot", text=record["output"], generation_id=chosen
            )
            if not is_alias(author.id):
                rejected = [g for g in generation_ids if g != chosen]
                await self.store.add_preference_pairs(chosen, rejected, author.id, "choice")
            turns = await self.store.active_turns(story.id)
            user_turn = next((t for t in turns if t.action == action and t.kind == "user"), None)
            return TurnResult(story, turn, user_turn, chosen, record["latency_s"])
