"""Feedback on the storyteller's turns: reactions on the messages that show them (written
in batches by `ReactionRecorder`) and 👍/👎 ratings from front ends without reactions.
"""

from __future__ import annotations

from ..config import MAX_ID
from ..errors import InvalidInput, NothingToRetry
from ..records import Author
from ..safety import clean_id
from ..storage import ReactionEvent, TellingRecords, is_alias
from .reactions import ReactionRecorder
from .stories import Stories


class Feedback:
    def __init__(self, stories: Stories, reactions: ReactionRecorder) -> None:
        self.stories = stories
        self.store: TellingRecords = stories.store
        self.reactions = reactions

    async def link_message(self, message_id: str, generation_id: int) -> None:
        """Remember that a front end's message shows this generation (reactions on the
        message are then feedback on it)."""
        message_id = clean_id(message_id, "The message id")
        if (
            not isinstance(generation_id, int)
            or not 0 < generation_id <= MAX_ID
            or not await self.store.link_message(message_id, generation_id)
        ):
            raise InvalidInput("There is no such generation to link.")

    async def record_reaction(
        self, message_id: str, user_id: str, emoji: str, *, added: bool
    ) -> bool:
        """Record (or, with `added=False`, remove) one user's emoji on a story message:
        one row per message, user and emoji (a split reply's parts keep their votes
        apart; training counts a user's emoji once per generation). Returns False when
        the message carries no story generation or the user asked to be forgotten.
        Reactions are written in batches (`ReactionRecorder`), in the order they came."""
        message_id = clean_id(message_id, "The message id")
        user_id = clean_id(user_id, "The user id")
        emoji = clean_id(emoji, "The emoji")
        value = dict(self.stories.settings.reaction_values).get(emoji, 0.0)
        return await self.reactions.record(
            ReactionEvent(message_id, user_id, emoji, bool(added), value)
        )

    async def rate(self, channel: str, author: Author, liked: bool) -> int:
        """The author's 👍 (`liked`) or 👎 on the storyteller's last turn, for front ends
        without reactions (the terminal): stored as that reaction would be, replacing
        the opposite one. Returns the generation rated."""
        author = await self.stories.who(author)
        story = await self.stories.active(channel)
        turns = await self.store.active_turns(story.id)
        last = next((t for t in reversed(turns) if t.kind == "bot" and t.generation_id), None)
        if last is None or last.generation_id is None:
            raise NothingToRetry("The storyteller has written nothing here to rate yet.")
        if is_alias(author.id):
            raise InvalidInput("You asked to be forgotten: your feedback is not recorded.")
        values = dict(self.stories.settings.reaction_values)
        emoji, other = ("👍", "👎") if liked else ("👎", "👍")
        await self.store.delete_feedback(last.generation_id, author.id, other)
        await self.store.set_feedback(
            last.generation_id, author.id, emoji, values.get(emoji, 1.0 if liked else -1.0)
        )
        return last.generation_id
