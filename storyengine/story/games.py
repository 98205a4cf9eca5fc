"""Round-robin games: seats in order, whose turn it is, and turns that time out.

The turn pointer and its deadline are stored with the story, so a restarted engine
resumes every game where it was, and turns missed while it was down pass on the first
`expire_turns`.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Protocol

from ..config import LIMITS
from ..errors import InvalidInput, NotYourTurn
from ..records import Author, Story, TurnState
from ..safety import clean_id
from ..storage import GameRecords, StoryRecords
from .permissions import Action
from .stories import Stories


class RoundRobinRecords(StoryRecords, GameRecords, Protocol):
    """What round-robin games read and write: stories and their seats."""


class RoundRobin:
    def __init__(self, stories: Stories) -> None:
        self.stories = stories
        self.store: RoundRobinRecords = stories.store

    async def turn_state(self, channel: str) -> TurnState:
        story = await self.stories.active(channel)
        return await self.stories.turn_state(story)

    async def join(self, channel: str, author: Author) -> TurnState:
        """Take a seat in a round-robin story (at the end of the order)."""
        author = await self.stories.who(author)
        async with self.stories.lock(channel):
            story = await self._game(channel)
            state = await self.stories.turn_state(story)
            if any(p.user_id == author.id for p in state.active_players):
                raise InvalidInput("You are already in this game.")
            await self.store.add_player(story.id, author.id, author.name)
            if state.current is None:
                await self.advance(story, after_seat=None)
            return await self.stories.turn_state(story)

    async def leave(self, channel: str, author: Author) -> TurnState:
        author = await self.stories.who(author)
        async with self.stories.lock(channel):
            story = await self._game(channel)
            state = await self.stories.turn_state(story)
            seat = next((p.seat for p in state.active_players if p.user_id == author.id), None)
            if seat is None:
                raise InvalidInput("You are not in this game.")
            await self.store.set_player_active(story.id, author.id, False)
            if state.current is not None and state.current.seat == seat:
                await self.advance(story, after_seat=seat)
            return await self.stories.turn_state(story)

    async def pass_turn(
        self, channel: str, author: Author, *, moderator: bool = False
    ) -> TurnState:
        """The current player passes (or a moderator skips them)."""
        author = await self.stories.who(author)
        moderator = moderator or author.moderator
        async with self.stories.lock(channel):
            story = await self._game(channel)
            state = await self.stories.turn_state(story)
            if state.current is None:
                raise InvalidInput("Nobody has the turn: join the game first.")
            if state.current.user_id != author.id and not moderator:
                raise NotYourTurn(
                    f"It is {state.current.user_name}'s turn; only they or a moderator can pass it."
                )
            await self.advance(story, after_seat=state.current.seat)
            return await self.stories.turn_state(story)

    async def set_turn_timeout(
        self, channel: str, seconds: int, *, by: Author | None = None
    ) -> None:
        low, high = LIMITS["turn_timeout_s"][1:]
        if not isinstance(seconds, int) or not low <= seconds <= (high or low):
            raise InvalidInput("The turn timeout must be between 30 seconds and 7 days.")
        channel = clean_id(channel, "The channel")
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.store.active_story(channel)
            if story is not None:
                await self.stories.allow(story, actor, Action.SETTINGS)
            await self.store.set_turn_timeout(channel, seconds)

    async def expire_turns(
        self, communities: Iterable[str | int] | None = None
    ) -> list[tuple[str, TurnState]]:
        """Pass every round-robin turn whose deadline has gone by. Returns the channels
        whose turn moved on, with their new state (the bot announces them). Deadlines are
        stored, so turns missed while the process was down pass on the first call.

        `communities` (server ids, for a server's stories): only the games of those, so
        that processes sharing one database, each serving its own servers (shards), never
        pass one another's turns; None: every game."""
        moved = []
        clock = self.stories.clock
        wanted = None if communities is None else {str(c) for c in communities}
        for channel in await self.store.overdue_turns(clock(), wanted):
            async with self.stories.lock(channel):
                story = await self.store.active_story(channel)
                if story is None:
                    continue
                state = await self.stories.turn_state(story)
                if state.deadline is None or state.deadline > clock():
                    continue  # someone took the turn meanwhile
                await self.advance(story, after_seat=state.current.seat if state.current else None)
                moved.append((channel, await self.stories.turn_state(story)))
        return moved

    async def check_turn(self, channel: str, author: Author) -> None:
        """Raise `NotYourTurn`, `NotAllowed` (or `NoActiveStory`) unless `author` may add
        a line now: lets a front end refuse politely before it starts any work."""
        story = await self.stories.active(channel)
        author = await self.stories.who(author)
        await self.stories.allow(story, author, Action.CONTINUE)
        if story.mode == "round-robin":
            await self.require_turn(story, author)

    async def require_turn(self, story: Story, author: Author) -> int:
        """The author's seat if the turn is theirs, else `NotYourTurn` saying whose."""
        state = await self.stories.turn_state(story)
        if state.current is None:
            raise NotYourTurn("Nobody has the turn yet: join the game first.")
        if state.current.user_id != author.id:
            if not any(p.user_id == author.id for p in state.active_players):
                raise NotYourTurn("Join the game first to add a line.")
            raise NotYourTurn(f"It is {state.current.user_name}'s turn. Yours will come!")
        return state.current.seat

    async def seat(self, story: Story, author: Author) -> None:
        """Seat the story's starter (or loader) and give them the turn."""
        await self.store.add_player(story.id, author.id, author.name)
        await self.advance(story, after_seat=None)

    async def unseat(self, story: Story, user_id: str) -> None:
        """Take someone out of a game (they asked to be forgotten), passing their turn."""
        state = await self.stories.turn_state(story)
        if any(p.user_id == user_id for p in state.active_players):
            await self.store.set_player_active(story.id, user_id, False)
            if state.current is not None and state.current.user_id == user_id:
                await self.advance(story, after_seat=state.current.seat)

    async def advance(self, story: Story, *, after_seat: int | None) -> None:
        """Give the turn to the next active player after `after_seat` (wrapping round),
        with a fresh deadline; nobody if no one is left."""
        active = [p for p in await self.store.players(story.id) if p.active]
        if not active:
            await self.store.set_turn(story.id, None, None)
            return
        later = [p for p in active if after_seat is None or p.seat > after_seat]
        nxt = (later or active)[0]
        timeout = (
            await self.store.turn_timeout(story.channel) or self.stories.settings.turn_timeout_s
        )
        await self.store.set_turn(story.id, nxt.seat, self.stories.clock() + timeout)

    async def _game(self, channel: str) -> Story:
        story = await self.stories.active(channel)
        if story.mode != "round-robin":
            raise InvalidInput("This story is not a round-robin game.")
        return story
