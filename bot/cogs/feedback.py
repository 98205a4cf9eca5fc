"""Reactions on the bot's story messages become feedback on the generation they show."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

import discord
from discord.ext import commands

if TYPE_CHECKING:
    from ..client import StoryBot

log = logging.getLogger(__name__)


class FeedbackCog(commands.Cog):
    def __init__(self, bot: StoryBot) -> None:
        self.bot = bot

    # Raw events: reactions on messages older than the cache still count.
    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self._record(payload, added=True)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self._record(payload, added=False)

    async def _record(self, payload: discord.RawReactionActionEvent, *, added: bool) -> None:
        if self.bot.user is not None and payload.user_id == self.bot.user.id:
            return
        if payload.member is not None and payload.member.bot:
            return
        try:
            # Messages the bot did not write carry no generation: the engine ignores them.
            await self.bot.engine.record_reaction(
                str(payload.message_id), str(payload.user_id), str(payload.emoji), added=added
            )
        except Exception:
            log.exception("recording a reaction failed")
