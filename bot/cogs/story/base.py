"""What every `/story` command shares: who acts, where, the per-user cooldown, replies
and the error handling of buttons."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal, TypeVar

import discord
from discord.ext import commands

from storyengine.config import (
    LIMITS,
    MAX_INPUT_CHARS,
)
from storyengine.errors import StoryError
from storyengine.records import DIRECT_MESSAGES, Author

from ...publish import (
    in_time,
    reply,
    report_error,
)

# Discord refuses what is past these before the bot sees it; the engine checks its own
# configured limits (STORY_MAX_INPUT_CHARS) and says so.
MAX_INPUT = MAX_INPUT_CHARS[1]
TURN_TIMEOUT = LIMITS["turn_timeout_s"][1:]

if TYPE_CHECKING:
    from ...client import StoryBot

T = TypeVar("T")
Mode = Literal["solo", "round-robin", "companion"]
PresetName = Literal["balanced", "gentle", "wild", "focused"]


class Cooldown(StoryError):
    pass


class StoryCommands(commands.Cog):
    """The `/story` cog's shared part; the cog (`StoryCog`) is this and one class per
    concern, mixed together into the one `/story` group."""

    def __init__(self, bot: StoryBot) -> None:
        self.bot = bot
        self.engine = bot.engine
        self._cooldowns = commands.CooldownMapping(
            commands.Cooldown(1, bot.settings.cooldown_s), _user_id
        )
        """One generating command per user per `BOT_COOLDOWN_S` (expired entries are
        dropped by the mapping)."""

    @staticmethod
    def channel_of(interaction: discord.Interaction[StoryBot]) -> str:
        return str(interaction.channel_id)

    @staticmethod
    def community_of(interaction: discord.Interaction[StoryBot]) -> str:
        """The server a story is told in (its learning switch applies), or the private
        community of direct messages, which is never trained on."""
        return str(interaction.guild_id) if interaction.guild_id else DIRECT_MESSAGES

    @staticmethod
    def author_of(interaction: discord.Interaction[StoryBot]) -> Author:
        """Who acts: a moderator (Manage Messages here) may override a story's owner."""
        return Author(
            str(interaction.user.id),
            interaction.user.display_name,
            moderator=bool(interaction.guild_id and interaction.permissions.manage_messages),
        )

    def channel_and_author(self, interaction: discord.Interaction[StoryBot]) -> tuple[str, Author]:
        return self.channel_of(interaction), self.author_of(interaction)

    async def act(
        self,
        interaction: discord.Interaction[StoryBot],
        action: Callable[..., Awaitable[T]],
        *args: Any,
        **kwargs: Any,
    ) -> T:
        """`action(channel, *args, by=author, **kwargs)`: an engine action on the
        interaction's channel by whoever acts, awaited in time (`in_time`)."""
        channel, author = self.channel_and_author(interaction)
        return await in_time(interaction, action(channel, *args, by=author, **kwargs))

    async def begin_writing(self, interaction: discord.Interaction[StoryBot]) -> None:
        """A command that has the storyteller write: the per-user pause, then "thinking..."
        while it writes (past Discord's 3-second deadline). Checks that refuse the
        command come before this, so that no work is shown."""
        self.cooldown(interaction)
        await interaction.response.defer(thinking=True)

    def cooldown(self, interaction: discord.Interaction[StoryBot]) -> None:
        """Per-user pause between generating commands."""
        if self.bot.settings.cooldown_s <= 0:
            return
        wait = self._cooldowns.update_rate_limit(interaction)
        if wait:
            raise Cooldown(f"Easy there, storyteller! Try again in {wait:.0f} s.")

    async def run_guarded(
        self,
        interaction: discord.Interaction[StoryBot],
        action: Callable[..., Awaitable[None]],
        *args: Any,
    ) -> None:
        """Run a button's action with the same error handling as a command."""
        try:
            await action(interaction, *args)
        except Exception as exc:
            await report_error(interaction, exc)

    async def say(
        self, interaction: discord.Interaction[StoryBot], text: str, *, ephemeral: bool = False
    ) -> None:
        """Reply with `text`, split over several messages if it is long."""
        await reply(interaction, text, ephemeral=ephemeral)


def _user_id(interaction: discord.Interaction[StoryBot]) -> int:
    return interaction.user.id
