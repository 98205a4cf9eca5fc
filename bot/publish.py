"""Putting a generation on Discord: progressive edits while it is written, then the
final text split into messages, with buttons, reactions and the link to the generation
that lets reactions count as feedback."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import TYPE_CHECKING

import discord

from storyengine.text import split_message

if TYPE_CHECKING:
    from .client import StoryBot

log = logging.getLogger(__name__)

FEEDBACK_EMOJI = ("👍", "👎")
LIMIT = 2000


class InteractionTarget:
    """Messages as the reply to a deferred interaction, then follow-ups."""

    def __init__(self, interaction: discord.Interaction) -> None:
        self.interaction = interaction
        self.channel_id = str(interaction.channel_id)

    async def edit_first(
        self, content: str, view: discord.ui.View | None = None
    ) -> discord.Message:
        kwargs = {"view": view} if view is not None else {}
        return await self.interaction.edit_original_response(content=content, **kwargs)

    async def send(self, content: str, view: discord.ui.View | None = None) -> discord.Message:
        kwargs = {"view": view} if view is not None else {}
        return await self.interaction.followup.send(content, wait=True, **kwargs)


class ChannelTarget:
    """Messages sent to a channel (a companion thread): a placeholder first, edited."""

    def __init__(self, channel: discord.abc.Messageable, channel_id: int) -> None:
        self.channel = channel
        self.channel_id = str(channel_id)
        self._first: discord.Message | None = None

    async def edit_first(
        self, content: str, view: discord.ui.View | None = None
    ) -> discord.Message:
        kwargs = {"view": view} if view is not None else {}
        if self._first is None:
            self._first = await self.channel.send(content, **kwargs)
        else:
            self._first = await self._first.edit(content=content, **kwargs)
        return self._first

    async def send(self, content: str, view: discord.ui.View | None = None) -> discord.Message:
        kwargs = {"view": view} if view is not None else {}
        return await self.channel.send(content, **kwargs)


Target = InteractionTarget | ChannelTarget


class Publisher:
    """For one generation: `progress` is the engine's `on_progress` callback (edits
    the reply as it grows, at most once per interval; while waiting in the queue it
    says how many are ahead); `finish` posts the final text."""

    def __init__(self, bot: StoryBot, target: Target, *, prefix: str = "") -> None:
        self.bot = bot
        self.target = target
        self.prefix = prefix
        self._last_edit = 0.0
        self._shown = False
        self._waiting: asyncio.Task[None] | None = None

    def __enter__(self) -> Publisher:
        self._waiting = asyncio.create_task(self._show_queue())
        return self

    def __exit__(self, *exc: object) -> None:
        if self._waiting is not None:
            self._waiting.cancel()

    async def _show_queue(self) -> None:
        shown = None
        while not self._shown:
            await asyncio.sleep(1.0)
            ahead = self.bot.engine.queue_position(self.target.channel_id)
            if ahead and ahead != shown and not self._shown:
                shown = ahead
                with contextlib.suppress(discord.HTTPException):
                    await self.target.edit_first(f"⏳ Waiting for the storyteller ({ahead} ahead)…")

    async def progress(self, text: str) -> None:
        now = time.monotonic()
        if now - self._last_edit < self.bot.settings.edit_interval_s:
            return
        self._last_edit = now
        self._shown = True
        body = (self.prefix + text)[: LIMIT - 2] + " …"
        with contextlib.suppress(discord.HTTPException):
            await self.target.edit_first(body)

    async def finish(
        self, text: str, generation_id: int | None, view: discord.ui.View | None
    ) -> list[discord.Message]:
        """Post `text`, split at sentence ends when over 2,000 characters: the first part
        replaces the reply, the others follow, the view goes on the last part. Each part
        gets 👍/👎 and is linked to the generation, so reactions count as feedback."""
        self._shown = True
        chunks = split_message(text, LIMIT) or ["…"]
        messages: list[discord.Message] = []
        for i, chunk in enumerate(chunks):
            part_view = view if i == len(chunks) - 1 else None
            if i == 0:
                messages.append(await self.target.edit_first(chunk, part_view))
            else:
                messages.append(await self.target.send(chunk, part_view))
        if generation_id is not None:
            for message in messages:
                await self.bot.engine.link_message(str(message.id), generation_id)
                await add_feedback_reactions(message)
        return messages


async def add_feedback_reactions(message: discord.Message) -> None:
    for emoji in FEEDBACK_EMOJI:
        try:
            await message.add_reaction(emoji)
        except discord.HTTPException:  # missing permission: feedback still works by hand
            log.warning("could not add %s to message %s", emoji, message.id)
            return


async def reply(interaction: discord.Interaction, text: str, *, ephemeral: bool = False) -> None:
    """Answer an interaction with `text`, split over several messages if it is long."""
    chunks = split_message(text) or ["…"]
    if interaction.response.is_done():
        await interaction.followup.send(chunks[0], ephemeral=ephemeral)
    else:
        await interaction.response.send_message(chunks[0], ephemeral=ephemeral)
    for chunk in chunks[1:]:
        await interaction.followup.send(chunk, ephemeral=ephemeral)
