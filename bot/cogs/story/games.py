"""Round-robin games: join, leave, pass, whose turn."""

from __future__ import annotations

import discord
from discord import app_commands

from ...publish import in_time
from ...render import describe_turn
from .base import StoryCommands


class Games(StoryCommands):
    @app_commands.command(name="join", description="Take a seat in this round-robin game")
    async def join(self, interaction: discord.Interaction) -> None:
        state = await in_time(
            interaction,
            self.engine.join(self.channel_of(interaction), self.author_of(interaction)),
        )
        await self.say(
            interaction, f"🪑 {interaction.user.display_name} joins. " + describe_turn(state)
        )

    @app_commands.command(name="leave", description="Leave this round-robin game")
    async def leave(self, interaction: discord.Interaction) -> None:
        state = await in_time(
            interaction,
            self.engine.leave(self.channel_of(interaction), self.author_of(interaction)),
        )
        await self.say(
            interaction, f"👋 {interaction.user.display_name} leaves. " + describe_turn(state)
        )

    @app_commands.command(
        name="pass", description="Pass your turn (moderators: skip the current player)"
    )
    async def pass_(self, interaction: discord.Interaction) -> None:
        state = await in_time(
            interaction,
            self.engine.pass_turn(self.channel_of(interaction), self.author_of(interaction)),
        )
        await self.say(interaction, "⏭️ Turn passed. " + describe_turn(state))

    @app_commands.command(name="turn", description="Whose turn it is, the order and the deadline")
    async def turn(self, interaction: discord.Interaction) -> None:
        await self.say(
            interaction,
            describe_turn(await self.engine.turn_state(self.channel_of(interaction))),
            ephemeral=True,
        )
