"""Telling a story: opening it, a line and the storyteller's reply, retries and their
alternatives (swipes), undo, and the end. Each operation takes the channel's lock, checks
who acts against `permissions`, and keeps round-robin turns in order.
"""

from __future__ import annotations

import logging
from typing import Any

from ..config import MAX_GENRE_CHARS
from ..errors import InvalidInput, NothingToRetry, NothingToUndo, StoryAlreadyRunning
from ..records import MODES, Author, Story, Swipe, Turn, TurnResult
from ..safety import clean_id, quoted
from ..sampling import SamplingParams
from ..storage import TellingRecords, is_alias
from .games import RoundRobin
from .memory import StoryMaterial
from .narrator import ProgressCallback
from .permissions import Action
from .stories import Stories
from .writing import Writer

log = logging.getLogger(__name__)

BRIDGE_TOKENS = 40
"""Round-robin: the storyteller's bridge between two players' lines is short."""


class Teller:
    def __init__(self, stories: Stories, games: RoundRobin, writer: Writer) -> None:
        self.stories = stories
        self.store: TellingRecords = stories.store
        self.games = games
        self.writer = writer

    async def start_story(
        self,
        channel: str,
        premise: str,
        *,
        author: Author,
        genre: str | None = None,
        mode: str = "solo",
        community: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TurnResult:
        """Open a story in `channel` and write its opening. `community` is where the
        story is told (a server's id, or DIRECT_MESSAGES); its learning switch decides
        whether the story is trained on. None: the operator's own story (CLI, library),
        always trainable."""
        if mode not in MODES:
            raise InvalidInput(
                f"Unknown mode {quoted(str(mode))}. Choose one of: {', '.join(MODES)}."
            )
        channel = clean_id(channel, "The channel")
        community = clean_id(community, "The community") if community is not None else None
        premise = self.stories.safety.clean_input(premise, what="The premise")
        genre = (
            self.stories.safety.clean_input(
                genre, what="The genre", required=False, limit=MAX_GENRE_CHARS
            )
            or None
        )
        author = await self.stories.who(author)
        async with self.stories.lock(channel):
            if await self.store.active_story(channel) is not None:
                raise StoryAlreadyRunning(channel)
            self.stories.builder(SamplingParams()).check_fits(StoryMaterial(premise, (), genre))
            story = await self.store.create_story(
                channel,
                premise,
                genre=genre,
                mode=mode,
                created_by=author.id,
                community=community,
            )
            log.info("story %d started in %s", story.id, channel)
            if mode == "round-robin":
                await self.games.seat(story, author)
            action = await self.store.next_action(story.id)
            return await self.writer.write_turn(story, [], action, None, on_progress)

    async def continue_story(
        self,
        channel: str,
        author: Author,
        text: str | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> TurnResult:
        """Add the author's line (optional) and let the storyteller continue."""
        line = self.stories.safety.clean_input(text, what="Your line", required=False)
        author = await self.stories.who(author)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, author, Action.CONTINUE)
            seat = (
                await self.games.require_turn(story, author)
                if story.mode == "round-robin"
                else None
            )
            if seat is not None:
                # Between players' lines the storyteller writes a short bridge.
                overrides.setdefault("max_new_tokens", BRIDGE_TOKENS)
            params = await self.stories.sampling_for(story.channel, **overrides)  # validates first
            await self.store.expire_open_choices(story.id)
            turns, user_turn, action = await self.add_user_line(story, author, line)
            result = await self.writer.write_turn(
                story, turns, action, user_turn, on_progress, params
            )
            if seat is not None:
                await self.games.advance(story, after_seat=seat)
            return result

    async def add_user_line(
        self, story: Story, author: Author, line: str
    ) -> tuple[list[Turn], Turn | None, int]:
        turns = await self.store.active_turns(story.id)
        action = await self.store.next_action(story.id)
        user_turn = None
        if line:
            user_turn = await self.store.add_turn(
                story.id,
                action=action,
                kind="user",
                text=line,
                author_id=author.id,
                author_name=author.name,
                train_excluded=is_alias(author.id),
            )
            turns.append(user_turn)
        return turns, user_turn, action

    async def retry(
        self,
        channel: str,
        *,
        by: Author | None = None,
        on_progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> TurnResult:
        """Write the last bot turn again. The old text is kept as an alternative."""
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, actor, Action.REWRITE)
            turns = await self.store.active_turns(story.id)
            if not turns or turns[-1].kind != "bot":
                raise NothingToRetry(
                    "The last turn is not the storyteller's; there is nothing to retry."
                )
            params = await self.stories.sampling_for(story.channel, **overrides)
            last = turns.pop()
            user_turn = turns[-1] if turns and turns[-1].action == last.action else None
            following = await self.store.next_best_candidate(last)
            if following is not None:  # best-of-n wrote it already: show the next best
                await self.store.swap_active(last.id, following.id)
                turn = await self.store.turn(following.id)
                assert turn is not None and turn.generation_id is not None
                return TurnResult(story, turn, user_turn, turn.generation_id, 0.0)
            return await self.writer.write_turn(
                story, turns, last.action, user_turn, on_progress, params, replacing=last
            )

    async def alternatives(self, channel: str) -> list[Turn]:
        """The retry stack of the last bot turn, oldest first (the active one included)."""
        story = await self.stories.active(channel)
        turns = await self.store.active_turns(story.id)
        if not turns or turns[-1].kind != "bot":
            return []
        return await self.store.alternatives(story.id, turns[-1].position)

    async def choose_alternative(
        self, channel: str, number: int, *, by: Author | None = None
    ) -> Turn:
        """Make alternative `number` (1-based, as listed by `alternatives`) the active one.
        The choice is a preference, as a companion choice is: the chosen one over the
        others (replacing what the same person chose here before)."""
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, actor, Action.REWRITE)
            options = await self.alternatives(channel)
            if not options:
                raise NothingToRetry("There are no alternatives to choose from.")
            if not isinstance(number, int) or not 1 <= number <= len(options):
                raise InvalidInput(f"Choose an alternative from 1 to {len(options)}.")
            chosen = options[number - 1]
            await self._keep(options, chosen, actor, over=[t.generation_id for t in options])
            turn = await self.store.turn(chosen.id)
            assert turn is not None
            return turn

    async def swipe(
        self, channel: str, story_id: int, position: int, step: int, *, by: Author | None = None
    ) -> Swipe:
        """Show the storyteller's latest reply's previous (`step` -1) or next (+1)
        alternative in its place (SillyTavern's swipes). The one kept is preferred over
        those paged past: each swipe replaces the person's pairs among these alternatives
        with "the one shown now over every one they have seen"."""
        if step not in (-1, 1):
            raise InvalidInput("A swipe goes one step back or forward.")
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel, story_id)
            await self.stories.allow(story, actor, Action.REWRITE)
            turns = await self.store.active_turns(story.id)
            if not turns or turns[-1].kind != "bot" or turns[-1].position != position:
                raise InvalidInput(
                    "Only the storyteller's latest reply can be swiped; this one is part "
                    "of the story now."
                )
            options = await self.store.alternatives(story.id, position)
            shown = next(i for i, t in enumerate(options) if t.status == "active")
            wanted = shown + step
            if not 0 <= wanted < len(options):
                raise NothingToRetry(
                    "This is the first one."
                    if step < 0
                    else "This is the newest one: Retry writes another."
                )
            chosen = options[wanted]
            seen = {options[shown].generation_id}
            if actor is not None:
                group = [t.generation_id for t in options if t.generation_id is not None]
                seen |= await self.store.choices_among(group, actor.id)
            await self._keep(options, chosen, actor, over=list(seen))
            turn = await self.store.turn(chosen.id)
            assert turn is not None
            before = turns[-2] if len(turns) > 1 and turns[-2].kind == "user" else None
            return Swipe(turn, wanted + 1, len(options), before)

    async def _keep(
        self, options: list[Turn], chosen: Turn, actor: Author | None, over: list[int | None]
    ) -> None:
        """Make `chosen` (one of `options`, a turn's alternatives) the active one; with a
        person choosing, record it as preferred over the generations `over`."""
        current = next(t for t in options if t.status == "active")
        if chosen.id != current.id:
            await self.store.swap_active(current.id, chosen.id)
        if actor is None or is_alias(actor.id) or chosen.generation_id is None:
            return
        rejected = [g for g in over if g is not None and g != chosen.generation_id]
        if rejected:
            group = [t.generation_id for t in options if t.generation_id is not None]
            await self.store.replace_choice(group, chosen.generation_id, rejected, actor.id)

    async def undo(self, channel: str, *, by: Author | None = None) -> list[Turn]:
        """Remove the most recent action (a user's line and the reply to it, or a bot
        turn on its own). The turns stay in the database, marked undone."""
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, actor, Action.REWRITE)
            turns = await self.store.active_turns(story.id)
            if not turns:
                raise NothingToUndo("There is nothing to undo yet.")
            last_action = max(t.action for t in turns)
            removed = [t for t in turns if t.action == last_action]
            await self.store.undo_action(story.id, last_action)
            return removed

    async def end_story(self, channel: str, *, by: Author | None = None) -> Story:
        """End the channel's story (stopping any generation in progress first)."""
        actor = await self.stories.actor(by)
        story = await self.stories.active(channel)
        await self.stories.allow(story, actor, Action.END)
        self.writer.cancel(story.channel)
        async with self.stories.lock(story.channel):
            story = await self.stories.active(channel)
            await self.store.end_story(story.id)
            ended = await self.store.story(story.id)
            assert ended is not None
            return ended

    async def request_stop(self, channel: str, *, by: Author | None) -> bool:
        """`stop`, for someone whose permission is checked first (`Action.REWRITE`)."""
        channel = clean_id(channel, "The channel")
        if not self.writer.is_generating(channel):
            return False
        story = await self.store.active_story(channel)
        if story is not None:
            await self.stories.allow(story, await self.stories.actor(by), Action.REWRITE)
        return self.writer.cancel(channel)
