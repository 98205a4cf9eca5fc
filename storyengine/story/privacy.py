"""A person's data is theirs: everything stored about them, as plain data, and forgetting
them (reactions and preferences deleted, lines kept under an alias, never trained on).
"""

from __future__ import annotations

from typing import Any, Protocol

from ..records import ForgetReport
from ..safety import clean_id
from ..storage import PeopleRecords, StoryRecords
from .games import RoundRobin
from .reactions import ReactionRecorder
from .stories import Stories


class PrivacyRecords(StoryRecords, PeopleRecords, Protocol):
    """What a person's export and forgetting use: the stories and the people in them."""


class Privacy:
    def __init__(self, stories: Stories, games: RoundRobin, reactions: ReactionRecorder) -> None:
        self.stories = stories
        self.store: PrivacyRecords = stories.store
        self.games = games
        self.reactions = reactions

    async def forget_user(self, user_id: str) -> ForgetReport:
        """Delete the user's reactions and preferences, anonymise their lines (kept in
        shared stories, under an alias, never trained on), take them out of round-robin
        games, and never record their id or name again: what they do afterwards is
        stored under their alias. Their own stories stay theirs (the alias owns them)."""
        user_id = clean_id(user_id, "The user id")
        await self.reactions.flush()  # a reaction queued before this must not land after
        for story in await self.store.active_stories():
            if story.mode != "round-robin":
                continue
            async with self.stories.lock(story.channel):
                await self.games.unseat(story, user_id)
        feedback, pairs, turns = await self.store.forget_user(user_id)
        return ForgetReport(feedback, pairs, turns)

    async def export_user_data(self, user_id: str) -> dict[str, Any]:
        """Every row that refers to the user, as plain data (for a JSON download)."""
        await self.reactions.flush()
        return await self.store.user_data(clean_id(user_id, "The user id"))
