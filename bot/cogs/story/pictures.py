"""`/story illustrate`: a picture for a turn, drawn by the configured image backend."""

from __future__ import annotations

import asyncio
import contextlib
import io
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from ...publish import safe
from .base import StoryCommands

if TYPE_CHECKING:
    from ...client import StoryBot


class Pictures(StoryCommands):
    @app_commands.command(name="illustrate", description="A picture for a turn of the story")
    @app_commands.describe(turn="which turn, counted from the story's start (default: the last)")
    async def illustrate(
        self,
        interaction: discord.Interaction[StoryBot],
        turn: app_commands.Range[int, 1, 100_000] | None = None,
    ) -> None:
        channel, author = self.channel_and_author(interaction)
        # Refusals (off, not a player, no such turn) come before any "drawing..." reply.
        order = await self.engine.order_picture(channel, turn, by=author)
        await self.begin_writing(interaction)
        heading = f"🎨 Turn {order.turn} of {order.turns}"
        step = [0, 0]
        moved = asyncio.Event()

        def report(done: int, steps: int) -> None:  # on the event loop, from the backend
            step[:] = [done, steps]
            moved.set()

        async def show_progress() -> None:  # one edit at a time, at most every interval
            while True:
                await moved.wait()
                moved.clear()
                done, steps = step
                await interaction.edit_original_response(
                    content=safe(f"{heading}: drawing… {done}/{steps}")
                )
                await asyncio.sleep(self.bot.settings.edit_interval_s)

        shower = asyncio.create_task(show_progress())
        try:
            async with self.bot.work.tracked():
                drawn = await self.engine.draw_picture(order, on_progress=report)
        finally:
            shower.cancel()
            with contextlib.suppress(asyncio.CancelledError, discord.HTTPException):
                await shower
        picture = drawn.picture
        file = discord.File(
            io.BytesIO(picture.data), filename=f"turn-{order.turn}.{picture.extension}"
        )
        await interaction.edit_original_response(
            content=safe(f"{heading}\n-# {order.prompt}"), attachments=[file]
        )
