"""Putting text on Discord.

Everything the bot shows passes `safe()` here or in `reply()`: mention syntax defused
(whoever wrote it: the model, a user's line quoted back, a card's name) and cut to
Discord's 2,000 characters. A generation is shown by a `Publisher`: progressive edits
while it is written, then the final text split into messages, with buttons, reactions
and the link to the generation that lets reactions count as feedback. If the
generation is stopped (`/story stop`, or the bot shutting down) the message keeps what
was written and says so, instead of staying cut off at "…".
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any, TypeVar

import discord
from discord import app_commands

from storyengine.errors import GenerationCancelled, StoryError
from storyengine.safety import neutralize_mentions
from storyengine.text import split_message

if TYPE_CHECKING:
    from .client import StoryBot

log = logging.getLogger(__name__)

T = TypeVar("T")
FEEDBACK_EMOJI = ("👍", "👎")
LIMIT = 2000


def safe(text: str, limit: int = LIMIT) -> str:
    """Text fit to show: mentions defused, at most `limit` characters."""
    text = neutralize_mentions(text)
    return text if len(text) <= limit else text[: limit - 1] + "…"


class InteractionTarget:
    """Messages as the reply to a deferred interaction, then follow-ups."""

    def __init__(self, interaction: discord.Interaction[StoryBot]) -> None:
        self.interaction = interaction
        self.channel_id = str(interaction.channel_id)

    async def edit_first(
        self, content: str, view: discord.ui.View | None = None
    ) -> discord.Message:
        kwargs: dict[str, Any] = {"view": view} if view is not None else {}
        return await self.interaction.edit_original_response(content=safe(content), **kwargs)

    async def send(self, content: str, view: discord.ui.View | None = None) -> discord.Message:
        kwargs: dict[str, Any] = {"view": view} if view is not None else {}
        return await self.interaction.followup.send(safe(content), wait=True, **kwargs)


class ChannelTarget:
    """Messages sent to a channel (a companion thread): a placeholder first, edited."""

    def __init__(self, channel: discord.abc.Messageable, channel_id: int) -> None:
        self.channel = channel
        self.channel_id = str(channel_id)
        self._first: discord.Message | None = None

    async def edit_first(
        self, content: str, view: discord.ui.View | None = None
    ) -> discord.Message:
        kwargs: dict[str, Any] = {"view": view} if view is not None else {}
        if self._first is None:
            self._first = await self.channel.send(safe(content), **kwargs)
        else:
            self._first = await self._first.edit(content=safe(content), **kwargs)
        return self._first

    async def send(self, content: str, view: discord.ui.View | None = None) -> discord.Message:
        kwargs: dict[str, Any] = {"view": view} if view is not None else {}
        return await self.channel.send(safe(content), **kwargs)


Target = InteractionTarget | ChannelTarget


class Publisher:
    """For one generation: `progress` is the engine's `on_progress` callback (edits
    the reply as it grows, at most once per interval; while waiting in the queue it
    says how many are ahead); `finish` posts the final text. Use it as an async context
    manager: the bot waits for open publishers when it shuts down, and a generation that
    is stopped leaves its message saying so."""

    def __init__(self, bot: StoryBot, target: Target, *, prefix: str = "") -> None:
        self.bot = bot
        self.target = target
        self.prefix = prefix
        self._last_edit = 0.0
        self._shown = False
        self._text = ""
        self._waiting: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Publisher:
        self.bot.work.begin()
        self._waiting = asyncio.create_task(self._show_queue())
        return self

    async def __aexit__(self, kind: object, exc: BaseException | None, tb: object) -> None:
        try:
            if self._waiting is not None:
                self._waiting.cancel()
            if isinstance(exc, GenerationCancelled) and not getattr(exc, "reported", False):
                body = (self.prefix + self._text).rstrip()
                note = f"⏹️ {exc}"
                with contextlib.suppress(discord.HTTPException):
                    await self.target.edit_first(
                        (safe(body, LIMIT - len(note) - 2) + "\n\n" + note) if body else note,
                        discord.ui.View(),  # no buttons on a stopped message
                    )
                    exc.reported = True  # type: ignore[attr-defined]
        finally:
            self.bot.work.end()

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
        self._text = text
        now = time.monotonic()
        if now - self._last_edit < self.bot.settings.edit_interval_s:
            return
        self._last_edit = now
        self._shown = True
        with contextlib.suppress(discord.HTTPException):
            await self.target.edit_first(safe(self.prefix + text, LIMIT - 2) + " …")

    async def finish(
        self, text: str, generation_id: int | None, view: discord.ui.View | None
    ) -> list[discord.Message]:
        """Post `text`, split at sentence ends when over 2,000 characters: the first part
        replaces the reply, the others follow, the view goes on the last part. Each part
        gets 👍/👎 and is linked to the generation, so reactions count as feedback."""
        self._shown = True
        chunks = split_message(neutralize_mentions(text), LIMIT) or ["…"]
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


async def reply(
    interaction: discord.Interaction[StoryBot], text: str, *, ephemeral: bool = False
) -> None:
    """Answer an interaction with `text` (mentions defused), split over several
    messages if it is long. A deferred "thinking…" reply becomes the answer."""
    chunks = split_message(neutralize_mentions(text)) or ["…"]
    deferred = interaction.response.type is discord.InteractionResponseType.deferred_channel_message
    if deferred and not interaction.extras.get("answered"):
        interaction.extras["answered"] = True
        await interaction.edit_original_response(content=chunks[0])
    elif interaction.response.is_done():
        await interaction.followup.send(chunks[0], ephemeral=ephemeral)
    else:
        await interaction.response.send_message(chunks[0], ephemeral=ephemeral)
    for chunk in chunks[1:]:
        await interaction.followup.send(chunk, ephemeral=ephemeral)


DEFER_AFTER_S = 1.0
"""A command that is not answered within this long is acknowledged first (Discord
gives 3 seconds): it may be waiting for the storyteller to finish in its channel."""


async def in_time(interaction: discord.Interaction[StoryBot], work: Awaitable[T]) -> T:
    """Await `work`; if it takes longer than DEFER_AFTER_S, defer the interaction (a
    "thinking…" reply for a command, a silent acknowledgement for a button) and go on
    waiting, so the interaction never times out."""
    task = asyncio.ensure_future(work)
    try:
        return await asyncio.wait_for(asyncio.shield(task), DEFER_AFTER_S)
    except TimeoutError:
        if not interaction.response.is_done():
            component = interaction.type is discord.InteractionType.component
            await interaction.response.defer(thinking=not component)
        return await task


async def edit_reply(
    interaction: discord.Interaction[StoryBot], text: str, *, view: discord.ui.View | None = None
) -> None:
    """Replace a deferred (or earlier) reply's text, mentions defused, cut to fit."""
    kwargs: dict[str, Any] = {"view": view} if view is not None else {}
    await interaction.edit_original_response(content=safe(text), **kwargs)


async def update_message(
    interaction: discord.Interaction[StoryBot], content: str, *, view: discord.ui.View | None = None
) -> discord.Message:
    """Replace the message a button is on (its text and its buttons; `view=None` takes
    the buttons away), whether or not `in_time` had to acknowledge the press first."""
    if interaction.response.is_done():
        return await interaction.edit_original_response(content=safe(content), view=view)
    await interaction.response.edit_message(content=safe(content), view=view)
    return await interaction.original_response()


async def report_error(interaction: discord.Interaction[StoryBot], error: Exception) -> None:
    """A short ephemeral message for the user; the full trace in the log for bugs."""
    original = getattr(error, "original", error)
    if getattr(original, "reported", False):  # the message itself already says so
        return
    if isinstance(original, StoryError):
        message = str(original)
    elif isinstance(error, app_commands.CommandOnCooldown):
        message = f"Easy there, storyteller! Try again in {error.retry_after:.0f} s."
    elif isinstance(error, app_commands.CheckFailure):
        message = str(error) or "You can't use that here."
    else:
        log.error("command failed", exc_info=original)
        message = "Something went wrong on my side; it has been logged. Please try again."
    message = safe(message, 1900)
    try:
        if interaction.response.type is discord.InteractionResponseType.deferred_channel_message:
            # A public "thinking…" placeholder is waiting: it becomes the answer.
            await interaction.edit_original_response(content=f"⚠️ {message}", view=None)
        elif interaction.response.is_done():
            await interaction.followup.send(message, ephemeral=True)
        else:
            await interaction.response.send_message(message, ephemeral=True)
    except discord.HTTPException:
        log.exception("could not report an error to the user")
