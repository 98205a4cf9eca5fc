"""Help, and a person's own data: what is stored, download it, forget me."""

from __future__ import annotations

import io
import json
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands

from ...publish import (
    in_time,
    update_message,
)
from ...render import HELP, PRIVACY
from ...views import ConfirmView
from .base import StoryCommands

if TYPE_CHECKING:
    from ...client import StoryBot


class Privacy(StoryCommands):
    @app_commands.command(
        name="help", description="What the storyteller can do, or what it stores about you"
    )
    @app_commands.describe(topic="commands (the default), or privacy: what is stored and why")
    async def help(
        self,
        interaction: discord.Interaction[StoryBot],
        topic: Literal["commands", "privacy"] = "commands",
    ) -> None:
        # One command for both: `/story` holds 25 subcommands, Discord's most.
        await self.say(interaction, PRIVACY if topic == "privacy" else HELP, ephemeral=True)

    @app_commands.command(name="my-data", description="Download everything stored about you")
    async def my_data(self, interaction: discord.Interaction[StoryBot]) -> None:
        data = await self.engine.export_user_data(str(interaction.user.id))
        file = discord.File(
            io.BytesIO(json.dumps(data, indent=2, ensure_ascii=False).encode()),
            filename="my-taleweaver-data.json",
        )
        await interaction.response.send_message(
            "Here is what I store about you.", file=file, ephemeral=True
        )

    @app_commands.command(
        name="forget-me", description="Delete your feedback and keep your lines out of training"
    )
    async def forget_me(self, interaction: discord.Interaction[StoryBot]) -> None:
        view = ConfirmView(interaction.user.id)
        await interaction.response.send_message(
            "This deletes your reactions and choices, anonymises your lines in shared stories "
            "(they stay in the story, without your name, and are never trained on) and stops "
            "recording your feedback. It cannot be undone. Go ahead?",
            view=view,
            ephemeral=True,
        )
        await view.wait()
        if view.interaction is None:  # timed out
            await interaction.edit_original_response(content="Nothing was changed.", view=None)
            return
        if not view.confirmed:
            await update_message(view.interaction, "Nothing was changed.")
            return
        report = await in_time(view.interaction, self.engine.forget_user(str(interaction.user.id)))
        await update_message(
            view.interaction,
            f"Done: {report.feedback_deleted} reaction(s) and {report.preferences_deleted} "
            f"choice(s) deleted, {report.turns_anonymised} line(s) anonymised.",
        )
