"""Round-robin games: join, leave, pass, whose turn."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from storyengine.records import Author, TurnState

from ...publish import in_time
from ...render import describe_turn
from .base import StoryCommands

if TYPE_CHECKING:
    from ...client import StoryBot


class Games(StoryCommands):
    @app_commands.command(name="join", description="Take a seat in this round-robin game")
    async def join(self, interaction: discord.Interaction[StoryBot]) -> None:
        said = f"🪑 {interaction.user.display_name} joins. "
        await self._move(interaction, self.engine.join, said)

    @app_commands.command(name="leave", description="Leave this round-robin game")
    async def leave(self, interaction: discord.Interaction[StoryBot]) -> None:
        said = f"👋 {interaction.user.display_name} leaves. "
        await self._move(interaction, self.engine.leave, said)

    @app_commands.command(
        name="pass", description="Pass your turn (moderators: skip the current player)"
    )
    async def pass_(self, interaction: discord.Interaction[StoryBot]) -> None:
        await self._move(interaction, self.engine.pass_turn, "⏭️ Turn passed. ")

    async def _move(
        self,
        interaction: discord.Interaction[StoryBot],
        move: Callable[[str, Author], Awaitable[TurnState]],
        said: str,
    ) -> None:
        """A move in the channel's game by whoever acts, then what it `said` and whose
        turn it is now."""
        state = await in_time(interaction, move(*self.channel_and_author(interaction)))
        await self.say(interaction, said + describe_turn(state))

    @app_commands.command(name="turn", description="Whose turn it is, the order and the deadline")
    async def turn(self, interaction: discord.Interaction[StoryBot]) -> None:
        await self.say(
            interaction,
            describe_turn(await self.engine.turn_state(self.channel_of(interaction))),
            ephemeral=True,
        )
