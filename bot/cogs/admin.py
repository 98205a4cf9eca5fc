"""`/storyadmin ...`: the learning loop, for a server's admins (Manage Server).

Learning is per server and off by default: `/storyadmin learning on` lets this
server's stories and reactions train the storyteller. The adapter is shared by every
server the bot is in, so training and rollback can be limited to the admins of some
servers (BOT_ADMIN_GUILDS).
"""

from __future__ import annotations

import asyncio
import io
import time
from typing import TYPE_CHECKING, Literal

import discord
from discord import app_commands
from discord.ext import commands

from storyengine import render_chart, summary_lines
from storyengine.progress import text_bar

from ..publish import reply, safe

if TYPE_CHECKING:
    from storyengine import TrainingJob

    from ..client import StoryBot

TRAIN_WATCH_S = 14 * 60
"""How long `/storyadmin train` keeps its reply up to date (an interaction's token
lasts 15 minutes); the round itself goes on regardless."""


CHART_NAME = "taleweaver-feedback.png"
CHART_ALT = (
    "Bar charts: approval per adapter version with the number of votes behind each, and"
    " reactions per day over the last 30 days"
)


Lineage = Literal["this-server", "shared"]


class AdminOnly(app_commands.CheckFailure):
    pass


@app_commands.guild_only()
@app_commands.default_permissions(manage_guild=True)
class AdminCog(
    commands.GroupCog,
    group_name="storyadmin",
    group_description="The storyteller's learning (Manage Server)",
):
    def __init__(self, bot: StoryBot) -> None:
        self.bot = bot
        self.engine = bot.engine
        super().__init__()

    async def interaction_check(self, interaction: discord.Interaction[StoryBot]) -> bool:
        # Discord hides the commands from others by default, but a server can change
        # that in its settings; the permission is checked here as well.
        if not interaction.permissions.manage_guild:
            raise AdminOnly("Only members with the Manage Server permission can do that.")
        return True

    def check_shared_adapter(self, interaction: discord.Interaction[StoryBot]) -> None:
        allowed = self.bot.settings.admin_guild_ids
        if allowed and interaction.guild_id not in allowed:
            raise AdminOnly(
                "The storyteller is shared with other servers; only the bot owner's "
                "servers can train or roll it back."
            )

    async def reply(self, interaction: discord.Interaction[StoryBot], text: str) -> None:
        await reply(interaction, text, ephemeral=True)  # admin answers are private

    @app_commands.command(
        name="learning", description="Let this server's stories train the storyteller, or not"
    )
    @app_commands.describe(state="on: train on this server's stories and reactions; off: don't")
    async def learning(
        self, interaction: discord.Interaction[StoryBot], state: Literal["on", "off"] | None = None
    ) -> None:
        community = str(interaction.guild_id)
        if state is not None:
            await self.engine.set_learning(community, state == "on", by=str(interaction.user.id))
        enabled = await self.engine.learning_enabled(community)
        if enabled:
            text = (
                "🧠 Learning is **on** here: this server's stories and reactions help "
                "train the storyteller. Members can opt out with `/story forget-me`."
            )
        else:
            text = (
                "Learning is **off** here: nothing from this server is trained on. "
                "`/storyadmin learning on` to change that."
            )
        await self.reply(interaction, text)

    @app_commands.command(name="stats", description="Feedback and approval per adapter version")
    async def stats(self, interaction: discord.Interaction[StoryBot]) -> None:
        # Drawing the chart takes a second or two: acknowledge first.
        await interaction.response.defer(ephemeral=True, thinking=True)
        community = str(interaction.guild_id)
        summary = await self.engine.learning.summary(community)
        lines = [
            f"**Learning** {'on' if await self.engine.learning_enabled(community) else 'off'}"
            f" · **serving** {await self.serving_here(community)}",
            f"**New feedback** since this server's last round: "
            f"{await self.bot.training.new_feedback(community)}; since the shared adapter's "
            f"(all learning servers): {await self.bot.training.new_feedback()}",
            f"**Training** {self.training_state()}",
        ]
        if not summary.versions:
            lines.append("No story continuations in this server yet.")
            await interaction.edit_original_response(content="\n".join(lines))
            return
        # The chart shows the figures; the sentences say them (screen readers).
        lines += [f"• {line}" for line in summary_lines(summary, last=10)]
        png = await asyncio.to_thread(render_chart, summary, title="Feedback in this server")
        chart = discord.File(io.BytesIO(png), filename=CHART_NAME, description=CHART_ALT)
        await interaction.edit_original_response(
            content=safe("\n".join(lines), 2000), attachments=[chart]
        )

    async def serving_here(self, community: str) -> str:
        """What this server's stories are told with, in words."""
        return (await self.engine.learning.serving(community)).describe()

    def lineage(self, interaction: discord.Interaction[StoryBot], which: str | None) -> str | None:
        """The lineage an admin command acts on: this server's own (the default), or
        the shared one (only in BOT_ADMIN_GUILDS, when that is set)."""
        if which == "shared":
            self.check_shared_adapter(interaction)
            return None
        return str(interaction.guild_id)

    def training_state(self) -> str:
        job = self.bot.training.job
        schedule = self.bot.training.schedule
        auto = (
            f"automatic after {schedule.min_new_feedback} new reactions, at most every "
            f"{schedule.interval_s / 3600:g} h"
            if schedule.interval_s
            else "automatic rounds off"
        )
        if job is None:
            return f"idle ({auto})"
        return f"{job.outcome} ({auto})"

    @app_commands.command(name="adapters", description="Adapter versions and their gate reports")
    @app_commands.describe(adapter="this server's own versions (default), or the shared ones")
    async def adapters(
        self, interaction: discord.Interaction[StoryBot], adapter: Lineage | None = None
    ) -> None:
        community = None if adapter == "shared" else str(interaction.guild_id)
        versions = await self.engine.learning.versions(community)
        if not versions:
            await self.reply(
                interaction,
                "This server has no adapter of its own yet: it is served the shared one "
                "(`/storyadmin adapters adapter:shared`)."
                if community
                else "No shared adapter trained yet: the base model tells stories.",
            )
            return
        shown = versions[-15:]
        lines = [v.summary() for v in reversed(shown)]
        more = f"\n…and {len(versions) - len(shown)} older" if len(versions) > len(shown) else ""
        await self.reply(interaction, "\n".join(f"• {line}" for line in lines) + more)

    @app_commands.command(name="rollback", description="Serve the adapter version before this one")
    @app_commands.describe(adapter="this server's own (default), or the shared one")
    async def rollback(
        self, interaction: discord.Interaction[StoryBot], adapter: Lineage | None = None
    ) -> None:
        community = self.lineage(interaction, adapter)
        before, now = await self.engine.learning.rollback(community)
        after = now.name if now else "the shared adapter" if community else "the base model"
        await self.reply(
            interaction,
            f"↩️ Rolled back from {before.name if before else 'the base model'}: now serving "
            f"{after}.",
        )

    @app_commands.command(name="train", description="Start a training round now")
    @app_commands.describe(adapter="train this server's own (default), or the shared one")
    async def train(
        self, interaction: discord.Interaction[StoryBot], adapter: Lineage | None = None
    ) -> None:
        community = self.lineage(interaction, adapter)
        await interaction.response.defer(ephemeral=True, thinking=True)
        # The reason may be written to the database (TRAIN_MODE=external): no user id in it.
        job = await self.bot.training.start("asked by an admin", community=community)
        started = time.monotonic()
        shown = ""
        while job.running and time.monotonic() - started < TRAIN_WATCH_S:
            text = f"🏋️ Training round running: {job.last_line}" + progress_line(job)
            if text != shown:
                await interaction.edit_original_response(content=text)
                shown = text
            try:
                await asyncio.wait_for(job.done.wait(), self.bot.settings.edit_interval_s)
            except TimeoutError:
                pass
        if job.running:
            await interaction.edit_original_response(
                content=f"🏋️ Still training ({job.last_line}). "
                "`/storyadmin stats` shows how it ends."
            )
            return
        await interaction.edit_original_response(
            content=f"Training round finished: {job.outcome}" + progress_line(job)
        )


def progress_line(job: TrainingJob) -> str:
    """The round's training steps as a bar, from the child's structured progress lines
    (`storyengine.progress`): a second line, or nothing before training starts."""
    update = job.progress
    if update is None:
        return ""
    fraction = update.fraction
    bar = f"`{text_bar(fraction)}` " if fraction is not None else ""
    return f"\n{bar}{update.task}: {update.describe()}"
