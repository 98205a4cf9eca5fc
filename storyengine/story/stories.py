"""What every part of the engine shares: finding a channel's story, who acts and what
they may do, the channel's lock and style, and the prompt builder.

The engine's collaborators (telling, writing, games, companion, notes, files, ideas,
feedback, privacy) each hold the one `Stories` and the few collaborators they call.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..config import Settings
from ..errors import InvalidInput, NoActiveStory, StoryEnded
from ..records import Author, LoreCard, Story, Turn, TurnState
from ..safety import SafetyFilter, clean_id, clean_name
from ..sampling import SamplingParams, preset
from ..storage import FORMER_PLAYER, EngineRecords, is_alias
from .memory import ContextBudget, ContextBuilder, StoryMaterial
from .narrator import Narrator
from .permissions import Action, check

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StoryView:
    story: Story
    turns: list[Turn]
    lore: list[LoreCard]


class Stories:
    def __init__(self, settings: Settings, store: EngineRecords) -> None:
        self.settings = settings
        self.store = store
        self.narrator_or_none: Narrator | None = None
        """Set once the engine has started (the model is loaded)."""
        self.clock: Callable[[], float] = time.time
        """Wall clock for turn deadlines (tests replace it)."""
        self.locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """Per-channel locks, each kept while an operation holds or awaits it: a bot that
        opens a thread per story sees new channels for as long as it runs."""

    @property
    def narrator(self) -> Narrator:
        if self.narrator_or_none is None:
            raise RuntimeError("StoryEngine.start() has not been called")
        return self.narrator_or_none

    @property
    def safety(self) -> SafetyFilter:
        return self.narrator.safety

    def lock(self, channel: str) -> asyncio.Lock:
        """One operation per channel at a time (other channels go on)."""
        return self.locks.setdefault(clean_id(channel, "The channel"), asyncio.Lock())

    # -- who acts --------------------------------------------------------------------

    async def who(self, author: Author) -> Author:
        """The author as stored: a clean id and name; someone who asked to be forgotten
        becomes their alias, with no name."""
        user_id = clean_id(author.id, "The user id")
        if is_alias(user_id):  # aliases are made here, never handed in
            raise InvalidInput("That user id is reserved.")
        alias = await self.store.forgotten_alias(user_id)
        if alias is not None:
            return Author(alias, FORMER_PLAYER, moderator=author.moderator)
        return Author(user_id, clean_name(author.name), moderator=author.moderator)

    async def actor(self, by: Author | None) -> Author | None:
        """`by` as stored; None is the operator, who may do anything."""
        return None if by is None else await self.who(by)

    async def allow(self, story: Story, actor: Author | None, action: Action) -> None:
        """Raise `NotAllowed` unless `actor` may do `action` (see `permissions`)."""
        if actor is None or actor.moderator or story.mode == "solo":
            return
        turn = await self.turn_state(story) if story.mode == "round-robin" else None
        check(story, actor, action, turn)

    async def stored_id(self, user_id: str) -> str:
        """A user id as it is stored: an alias for someone who asked to be forgotten."""
        return (await self.who(Author(user_id, ""))).id

    async def check_allowed(self, channel: str, by: Author, action: Action) -> None:
        """Raise `NotAllowed` (or `NoActiveStory`) unless `by` may do `action` to the
        channel's story: for a front end that wants to refuse before it starts work."""
        story = await self.active(channel)
        await self.allow(story, await self.who(by), action)

    async def turn_state(self, story: Story) -> TurnState:
        """A round-robin story's seats and whose turn it is (until when)."""
        players = tuple(await self.store.players(story.id))
        seat, deadline = await self.store.turn_pointer(story.id)
        current = next((p for p in players if p.seat == seat and p.active), None)
        return TurnState(story.id, players, current, deadline if current else None)

    # -- the channel's story -------------------------------------------------------

    async def active(self, channel: str, story_id: int | None = None) -> Story:
        """The channel's running story; with `story_id` (a button bound to a story), that
        story only: once it has ended, `StoryEnded` rather than acting on a newer one."""
        story = await self.store.active_story(clean_id(channel, "The channel"))
        if story_id is not None and (story is None or story.id != story_id):
            raise StoryEnded(channel, story_id)
        if story is None:
            raise NoActiveStory(channel)
        return story

    async def find(self, channel: str) -> Story | None:
        """The channel's running story, or None."""
        return await self.store.active_story(clean_id(channel, "The channel"))

    async def view(self, channel: str) -> StoryView:
        """The running story with its turns and lore."""
        story = await self.active(channel)
        return StoryView(
            story, await self.store.active_turns(story.id), await self.store.lore(story.id)
        )

    async def active_or_latest(self, channel: str) -> Story:
        """The running story, or if none the channel's last one (for exports)."""
        channel = clean_id(channel, "The channel")
        story = await self.store.active_story(channel) or await self.store.latest_story(channel)
        if story is None:
            raise NoActiveStory(channel)
        return story

    async def sampling_for(self, channel: str, **overrides: Any) -> SamplingParams:
        """The channel's parameters: its preset (or the configured default) with the
        channel's overrides, then this call's overrides."""
        preset_name, saved = await self.store.channel_settings(clean_id(channel, "The channel"))
        params = preset(preset_name).params if preset_name else self.settings.sampling
        params = params.replace(best_of=self.settings.best_of)  # unless the channel says
        try:
            params = params.replace(**saved)
        except (InvalidInput, TypeError):  # saved by an older release with other bounds
            log.warning("ignoring channel %s's saved settings %r", channel, saved)
        try:
            return params.replace(**overrides)
        except TypeError:
            raise InvalidInput(f"Unknown setting among {sorted(overrides)}.") from None

    # -- prompts ----------------------------------------------------------------------

    def builder(self, params: SamplingParams) -> ContextBuilder:
        """Fits a story into the model's window, leaving room for `params`' reply."""
        model = self.narrator.info
        return ContextBuilder(
            model.count_tokens,
            ContextBudget(window=model.context_window, reserve=params.max_new_tokens),
        )

    @staticmethod
    def material(story: Story, turns: list[Turn], lore: list[LoreCard]) -> StoryMaterial:
        return StoryMaterial(
            premise=story.premise,
            turns=[t.text for t in turns],
            genre=story.genre,
            memory=story.memory,
            authors_note=story.authors_note,
            lore=lore,
        )

    async def prompt(self, story: Story, turns: list[Turn], params: SamplingParams) -> str:
        """What the model is handed to continue `turns`."""
        material = self.material(story, turns, await self.store.lore(story.id))
        return self.builder(params).build(material).text
