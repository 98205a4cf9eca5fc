"""Telling: open a story, a line and the reply, companion choices, retry and swipes,
undo, stop, recap, export, end, premise ideas, and the channel's style."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from storyengine import MAX_BEST_OF, Action
from storyengine.config import MAX_GENRE_CHARS
from storyengine.errors import InvalidInput
from storyengine.records import Author, Story

from ...publish import (
    ChannelTarget,
    InteractionTarget,
    Publisher,
    add_feedback_reactions,
    edit_reply,
    in_time,
    safe,
    update_message,
)
from ...render import choice_message, describe_turn, quote_line, story_message
from ...views import choice_controls, story_controls
from .base import MAX_INPUT, TURN_TIMEOUT, Mode, PresetName, StoryCommands

if TYPE_CHECKING:
    from ...client import StoryBot


class Telling(StoryCommands):
    @app_commands.command(name="start", description="Open a story in this channel")
    @app_commands.describe(
        premise="How the story begins, e.g. 'Once upon a time, a little fox...'",
        genre="fairy tale, mystery, adventure...",
        mode="solo: anyone goes on · round-robin: take turns · companion: just you and me",
        preset="storytelling style",
    )
    async def start(
        self,
        interaction: discord.Interaction[StoryBot],
        premise: app_commands.Range[str, 1, MAX_INPUT],
        genre: app_commands.Range[str, 1, MAX_GENRE_CHARS] | None = None,
        mode: Mode = "solo",
        preset: PresetName | None = None,
    ) -> None:
        await self.begin_writing(interaction)
        author = self.author_of(interaction)
        if mode == "companion" and interaction.guild is not None:
            await self._start_companion_thread(interaction, premise, genre, preset, author)
            return
        channel = self.channel_of(interaction)
        target = InteractionTarget(interaction)
        await self._open_story(interaction, target, channel, premise, genre, mode, preset, author)
        if mode == "round-robin":
            await interaction.followup.send(
                "🎲 Round-robin game: `/story join` to take a seat. "
                + describe_turn(await self.engine.turn_state(channel))
            )

    async def _start_companion_thread(
        self,
        interaction: discord.Interaction[StoryBot],
        premise: str,
        genre: str | None,
        preset: str | None,
        author: Author,
    ) -> None:
        """Companion sessions in a server get a thread of their own."""
        parent = interaction.channel
        if not isinstance(parent, discord.TextChannel):
            raise InvalidInput("Start a companion story in a text channel or in a DM with me.")
        thread = await parent.create_thread(
            name=premise[:90], type=discord.ChannelType.public_thread, auto_archive_duration=1440
        )
        await edit_reply(interaction, f"📖 Your story with me continues in {thread.mention}.")
        target = ChannelTarget(thread, thread.id)
        await self._open_story(
            interaction, target, str(thread.id), premise, genre, "companion", preset, author
        )
        await thread.send(
            "Write with `/story continue text:...` here; I'll offer you a few ways to go on."
        )

    async def _open_story(
        self,
        interaction: discord.Interaction[StoryBot],
        target: InteractionTarget | ChannelTarget,
        channel: str,
        premise: str,
        genre: str | None,
        mode: Mode,
        preset: str | None,
        author: Author,
    ) -> None:
        """A new story in `channel` (in `preset`'s style, if any), its opening published
        to `target` as it is written; Continue and Retry under it, but for a companion's."""
        if preset:
            await self.engine.configure_channel(channel, preset_name=preset, by=author)
        header = f"📖 **{premise}**"
        async with Publisher(self.bot, target, prefix=header + "\n\n") as pub:
            result = await self.engine.start_story(
                channel,
                premise,
                author=author,
                genre=genre,
                mode=mode,
                community=self.community_of(interaction),
                on_progress=pub.progress,
            )
            controls = story_controls(result.story.id, result.turn.position)
            view = None if mode == "companion" else controls
            await pub.finish(story_message(result.text, header=header), result.generation_id, view)

    @app_commands.command(
        name="continue", description="Add your line (optional) and let the storyteller go on"
    )
    @app_commands.describe(text="Your line of the story")
    async def continue_(
        self,
        interaction: discord.Interaction[StoryBot],
        text: app_commands.Range[str, 1, MAX_INPUT] | None = None,
    ) -> None:
        await self.do_continue(interaction, text)

    async def do_continue(
        self,
        interaction: discord.Interaction[StoryBot],
        text: str | None,
        story_id: int | None = None,
    ) -> None:
        """`/story continue`, or a Continue button (bound to its message's story)."""
        channel, author = self.channel_and_author(interaction)
        story = await self.engine.active_story(channel, story_id)
        await self.engine.check_turn(channel, author)  # refuse before any work is shown
        await self.begin_writing(interaction)
        if story.mode == "companion":
            await self._offer_choices(interaction, story, author, text)
            return
        prefix = quote_line(author.name, text) + "\n\n" if text else ""
        async with Publisher(self.bot, InteractionTarget(interaction), prefix=prefix) as pub:
            result = await self.engine.continue_story(
                channel, author, text, on_progress=pub.progress
            )
            user_line = (author.name, result.user_turn.text) if result.user_turn else None
            await pub.finish(
                story_message(result.text, user_line=user_line),
                result.generation_id,
                story_controls(result.story.id, result.turn.position),
            )
        if story.mode == "round-robin":
            await interaction.followup.send(
                safe(describe_turn(await self.engine.turn_state(channel)))
            )

    async def _offer_choices(
        self,
        interaction: discord.Interaction[StoryBot],
        story: Story,
        author: Author,
        text: str | None,
    ) -> None:
        async with self.bot.work.tracked():
            offer = await self.engine.offer_choices(story.channel, author, text, count=3)
            await edit_reply(
                interaction,
                choice_message(offer, author.name),
                view=choice_controls(offer.id, len(offer.options)),
            )

    async def do_choose(
        self, interaction: discord.Interaction[StoryBot], choice_id: int, position: int
    ) -> None:
        channel, author = self.channel_and_author(interaction)
        result = await in_time(
            interaction, self.engine.choose(channel, choice_id, position, author)
        )
        user_line = (author.name, result.user_turn.text) if result.user_turn else None
        message = await update_message(interaction, story_message(result.text, user_line=user_line))
        await self.engine.link_message(str(message.id), result.generation_id)
        await add_feedback_reactions(message)

    @app_commands.command(name="retry", description="Write the storyteller's last turn again")
    async def retry(self, interaction: discord.Interaction[StoryBot]) -> None:
        await self.do_retry(interaction)

    async def do_retry(
        self, interaction: discord.Interaction[StoryBot], story_id: int | None = None
    ) -> None:
        """`/story retry`, or a Retry button (bound to its message's story)."""
        channel, author = self.channel_and_author(interaction)
        if story_id is not None:
            await self.engine.active_story(channel, story_id)
        await self.engine.check_allowed(channel, author, Action.REWRITE)  # before any work
        await self.begin_writing(interaction)
        async with Publisher(self.bot, InteractionTarget(interaction), prefix="🔁 ") as pub:
            result = await self.engine.retry(channel, by=author, on_progress=pub.progress)
            await pub.finish(
                story_message(result.text, header="🔁"),
                result.generation_id,
                story_controls(result.story.id, result.turn.position),
            )

    async def do_swipe(
        self, interaction: discord.Interaction[StoryBot], story_id: int, position: int, step: int
    ) -> None:
        """◀ ▶: the reply's previous or next alternative, in place of this message's."""
        channel, author = self.channel_and_author(interaction)
        swipe = await in_time(
            interaction, self.engine.swipe(channel, story_id, position, step, by=author)
        )
        line = swipe.user_turn
        text = story_message(
            swipe.text,
            user_line=(line.author_name or "Someone", line.text) if line else None,
            header=f"🔀 {swipe.number}/{swipe.total}",
        )
        message = await update_message(interaction, text, view=story_controls(story_id, position))
        if swipe.turn.generation_id is not None:  # reactions now count for this one
            await self.engine.link_message(str(message.id), swipe.turn.generation_id)

    @app_commands.command(
        name="context", description="What the storyteller saw for its last reply (only you see it)"
    )
    async def context(self, interaction: discord.Interaction[StoryBot]) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # private throughout
        view = await self.engine.context(self.channel_of(interaction))
        await self.say(interaction, view.describe(), ephemeral=True)

    @app_commands.command(name="undo", description="Take back the last turn (a line and its reply)")
    async def undo(self, interaction: discord.Interaction[StoryBot]) -> None:
        removed = await self.act(interaction, self.engine.undo)
        await self.say(interaction, f"↩️ Undone: {len(removed)} turn(s).")

    @app_commands.command(name="stop", description="Stop the storyteller while it is writing")
    async def stop(self, interaction: discord.Interaction[StoryBot]) -> None:
        stopped = await self.engine.request_stop(
            self.channel_of(interaction), by=self.author_of(interaction)
        )
        await self.say(
            interaction,
            "⏹️ Stopped." if stopped else "Nothing is being written right now.",
            ephemeral=not stopped,
        )

    @app_commands.command(name="recap", description="The story so far, in brief")
    async def recap(self, interaction: discord.Interaction[StoryBot]) -> None:
        await self.say(interaction, await self.engine.recap(self.channel_of(interaction)))

    @app_commands.command(name="export", description="The story as a Markdown file")
    async def export(self, interaction: discord.Interaction[StoryBot]) -> None:
        markdown = await self.engine.export_markdown(self.channel_of(interaction))
        file = discord.File(io.BytesIO(markdown.encode("utf-8")), filename="story.md")
        await interaction.response.send_message("📜 Here is the story so far.", file=file)

    @app_commands.command(name="end", description="End the story in this channel")
    async def end(self, interaction: discord.Interaction[StoryBot]) -> None:
        await self.act(interaction, self.engine.end_story)
        await self.say(
            interaction,
            "🏁 The story has ended. `/story export` still works; `/story start` begins a new one.",
        )

    @app_commands.command(name="idea", description="Suggest a premise to start from")
    async def idea(
        self,
        interaction: discord.Interaction[StoryBot],
        genre: app_commands.Range[str, 1, MAX_GENRE_CHARS] | None = None,
    ) -> None:
        await self.begin_writing(interaction)
        async with self.bot.work.tracked():
            premise = await self.engine.suggest_premise(genre)
            await edit_reply(
                interaction, f"💡 {premise}\n\nStart it with `/story start premise:...`."
            )

    @app_commands.command(name="settings", description="This channel's storytelling style")
    @app_commands.describe(
        preset="a style preset (resets temperature and length)",
        temperature="randomness, 0 (predictable) to 2 (wild)",
        length="tokens per continuation (about 3/4 of a word each)",
        turn_timeout="round-robin: seconds before an untaken turn passes",
        best_of="with a reward model: continuations written per turn, the best shown (1: off)",
    )
    async def settings(
        self,
        interaction: discord.Interaction[StoryBot],
        preset: PresetName | None = None,
        temperature: app_commands.Range[float, 0.0, 2.0] | None = None,
        length: app_commands.Range[int, 16, 400] | None = None,
        turn_timeout: app_commands.Range[int, TURN_TIMEOUT[0], TURN_TIMEOUT[1]] | None = None,
        best_of: app_commands.Range[int, 1, MAX_BEST_OF] | None = None,
    ) -> None:
        if turn_timeout is not None:
            await self.act(interaction, self.engine.set_turn_timeout, turn_timeout)
        params = await self.act(
            interaction,
            self.engine.configure_channel,
            preset_name=preset,
            temperature=temperature,
            max_new_tokens=length,
            best_of=best_of,
        )
        style = "beam search" if params.beam_search else f"temperature {params.temperature}"
        await self.say(
            interaction,
            f"⚙️ {style}, length {params.max_new_tokens} tokens, best of {params.best_of}"
            + (f", turns pass after {turn_timeout} s" if turn_timeout else "")
            + ".",
        )
