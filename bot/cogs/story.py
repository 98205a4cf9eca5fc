"""`/story ...`: every story command, and the story buttons' actions.

Handlers validate, call the engine, and render; the story logic lives in the engine.
Anything that generates text defers first (Discord's 3-second deadline) and streams.
"""

from __future__ import annotations

import io
import json
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, Literal

import discord
from discord import app_commands
from discord.ext import commands

from storyengine import MAX_BEST_OF, MAX_LOREBOOK_BYTES, MAX_SAVE_BYTES, Action
from storyengine.config import (
    LIMITS,
    MAX_GENRE_CHARS,
    MAX_INPUT_CHARS,
    MAX_LORE_NAME,
    MAX_NOTE_CHARS,
)
from storyengine.errors import InvalidInput, StoryError
from storyengine.records import DIRECT_MESSAGES, Author, LoreCard, Story
from storyengine.safety import quoted

from ..publish import (
    ChannelTarget,
    InteractionTarget,
    Publisher,
    add_feedback_reactions,
    edit_reply,
    in_time,
    reply,
    report_error,
    safe,
    update_message,
)
from ..render import HELP, PRIVACY, choice_message, describe_turn, quote_line, story_message
from ..views import CardDraftView, ConfirmView, choice_controls, story_controls

# Discord refuses what is past these before the bot sees it; the engine checks its own
# configured limits (STORY_MAX_INPUT_CHARS) and says so.
MAX_INPUT = MAX_INPUT_CHARS[1]
TURN_TIMEOUT = LIMITS["turn_timeout_s"][1:]

if TYPE_CHECKING:
    from ..client import StoryBot

Mode = Literal["solo", "round-robin", "companion"]
PresetName = Literal["balanced", "gentle", "wild", "focused"]


class Cooldown(StoryError):
    pass


class StoryCog(commands.GroupCog, group_name="story", group_description="Tell a story together"):
    def __init__(self, bot: StoryBot) -> None:
        self.bot = bot
        self.engine = bot.engine
        self._last_generation: dict[int, float] = {}
        super().__init__()

    # -- helpers ------------------------------------------------------------------

    @staticmethod
    def channel_of(interaction: discord.Interaction) -> str:
        return str(interaction.channel_id)

    @staticmethod
    def community_of(interaction: discord.Interaction) -> str:
        """The server a story is told in (its learning switch applies), or the private
        community of direct messages, which is never trained on."""
        return str(interaction.guild_id) if interaction.guild_id else DIRECT_MESSAGES

    @staticmethod
    def author_of(interaction: discord.Interaction) -> Author:
        """Who acts: a moderator (Manage Messages here) may override a story's owner."""
        return Author(
            str(interaction.user.id),
            interaction.user.display_name,
            moderator=bool(interaction.guild_id and interaction.permissions.manage_messages),
        )

    def cooldown(self, interaction: discord.Interaction) -> None:
        """Per-user pause between generating commands."""
        now = time.monotonic()
        wait = self.bot.settings.cooldown_s - (
            now - self._last_generation.get(interaction.user.id, -1e9)
        )
        if wait > 0:
            raise Cooldown(f"Easy there, storyteller! Try again in {wait:.0f} s.")
        if len(self._last_generation) > 10_000:  # forget who wrote long ago
            horizon = now - self.bot.settings.cooldown_s
            self._last_generation = {u: t for u, t in self._last_generation.items() if t > horizon}
        self._last_generation[interaction.user.id] = now

    async def run_guarded(
        self, interaction: discord.Interaction, action: Callable[..., Awaitable[None]], *args: Any
    ) -> None:
        """Run a button's action with the same error handling as a command."""
        try:
            await action(interaction, *args)
        except Exception as exc:
            await report_error(interaction, exc)

    async def say(
        self, interaction: discord.Interaction, text: str, *, ephemeral: bool = False
    ) -> None:
        """Reply with `text`, split over several messages if it is long."""
        await reply(interaction, text, ephemeral=ephemeral)

    # -- starting -----------------------------------------------------------------

    @app_commands.command(name="start", description="Open a story in this channel")
    @app_commands.describe(
        premise="How the story begins, e.g. 'Once upon a time, a little fox...'",
        genre="fairy tale, mystery, adventure...",
        mode="solo: anyone goes on · round-robin: take turns · companion: just you and me",
        preset="storytelling style",
    )
    async def start(
        self,
        interaction: discord.Interaction,
        premise: app_commands.Range[str, 1, MAX_INPUT],
        genre: app_commands.Range[str, 1, MAX_GENRE_CHARS] | None = None,
        mode: Mode = "solo",
        preset: PresetName | None = None,
    ) -> None:
        self.cooldown(interaction)
        await interaction.response.defer(thinking=True)
        author = self.author_of(interaction)
        if mode == "companion" and interaction.guild is not None:
            await self._start_companion_thread(interaction, premise, genre, preset, author)
            return
        channel = self.channel_of(interaction)
        if preset:
            await self.engine.configure_channel(channel, preset_name=preset, by=author)
        header = f"📖 **{premise}**"
        target = InteractionTarget(interaction)
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
        if mode == "round-robin":
            await interaction.followup.send(
                "🎲 Round-robin game: `/story join` to take a seat. "
                + describe_turn(await self.engine.turn_state(channel))
            )

    async def _start_companion_thread(
        self,
        interaction: discord.Interaction,
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
        channel = str(thread.id)
        if preset:
            await self.engine.configure_channel(channel, preset_name=preset, by=author)
        header = f"📖 **{premise}**"
        target = ChannelTarget(thread, thread.id)
        async with Publisher(self.bot, target, prefix=header + "\n\n") as pub:
            result = await self.engine.start_story(
                channel,
                premise,
                author=author,
                genre=genre,
                mode="companion",
                community=self.community_of(interaction),
                on_progress=pub.progress,
            )
            await pub.finish(story_message(result.text, header=header), result.generation_id, None)
        await thread.send(
            "Write with `/story continue text:...` here; I'll offer you a few ways to go on."
        )

    # -- continuing ---------------------------------------------------------------

    @app_commands.command(
        name="continue", description="Add your line (optional) and let the storyteller go on"
    )
    @app_commands.describe(text="Your line of the story")
    async def continue_(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 1, MAX_INPUT] | None = None,
    ) -> None:
        await self.do_continue(interaction, text)

    async def do_continue(
        self, interaction: discord.Interaction, text: str | None, story_id: int | None = None
    ) -> None:
        """`/story continue`, or a Continue button (bound to its message's story)."""
        channel, author = self.channel_of(interaction), self.author_of(interaction)
        story = await self.engine.active_story(channel, story_id)
        await self.engine.check_turn(channel, author)  # refuse before any work is shown
        self.cooldown(interaction)
        await interaction.response.defer(thinking=True)
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
        self, interaction: discord.Interaction, story: Story, author: Author, text: str | None
    ) -> None:
        async with self.bot.work.tracked():
            offer = await self.engine.offer_choices(story.channel, author, text, count=3)
            await edit_reply(
                interaction,
                choice_message(offer, author.name),
                view=choice_controls(offer.id, len(offer.options)),
            )

    async def do_choose(
        self, interaction: discord.Interaction, choice_id: int, position: int
    ) -> None:
        channel, author = self.channel_of(interaction), self.author_of(interaction)
        result = await in_time(
            interaction, self.engine.choose(channel, choice_id, position, author)
        )
        user_line = (author.name, result.user_turn.text) if result.user_turn else None
        message = await update_message(interaction, story_message(result.text, user_line=user_line))
        await self.engine.link_message(str(message.id), result.generation_id)
        await add_feedback_reactions(message)

    @app_commands.command(name="retry", description="Write the storyteller's last turn again")
    async def retry(self, interaction: discord.Interaction) -> None:
        await self.do_retry(interaction)

    async def do_retry(self, interaction: discord.Interaction, story_id: int | None = None) -> None:
        """`/story retry`, or a Retry button (bound to its message's story)."""
        channel, author = self.channel_of(interaction), self.author_of(interaction)
        if story_id is not None:
            await self.engine.active_story(channel, story_id)
        await self.engine.check_allowed(channel, author, Action.REWRITE)  # before any work
        self.cooldown(interaction)
        await interaction.response.defer(thinking=True)
        async with Publisher(self.bot, InteractionTarget(interaction), prefix="🔁 ") as pub:
            result = await self.engine.retry(channel, by=author, on_progress=pub.progress)
            await pub.finish(
                story_message(result.text, header="🔁"),
                result.generation_id,
                story_controls(result.story.id, result.turn.position),
            )

    async def do_swipe(
        self, interaction: discord.Interaction, story_id: int, position: int, step: int
    ) -> None:
        """◀ ▶: the reply's previous or next alternative, in place of this message's."""
        channel, author = self.channel_of(interaction), self.author_of(interaction)
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
    async def context(self, interaction: discord.Interaction) -> None:
        await interaction.response.defer(ephemeral=True, thinking=True)  # private throughout
        view = await self.engine.context(self.channel_of(interaction))
        await self.say(interaction, view.describe(), ephemeral=True)

    @app_commands.command(name="undo", description="Take back the last turn (a line and its reply)")
    async def undo(self, interaction: discord.Interaction) -> None:
        removed = await in_time(
            interaction,
            self.engine.undo(self.channel_of(interaction), by=self.author_of(interaction)),
        )
        await self.say(interaction, f"↩️ Undone: {len(removed)} turn(s).")

    @app_commands.command(name="stop", description="Stop the storyteller while it is writing")
    async def stop(self, interaction: discord.Interaction) -> None:
        stopped = await self.engine.request_stop(
            self.channel_of(interaction), by=self.author_of(interaction)
        )
        await self.say(
            interaction,
            "⏹️ Stopped." if stopped else "Nothing is being written right now.",
            ephemeral=not stopped,
        )

    @app_commands.command(name="recap", description="The story so far, in brief")
    async def recap(self, interaction: discord.Interaction) -> None:
        await self.say(interaction, await self.engine.recap(self.channel_of(interaction)))

    @app_commands.command(name="export", description="The story as a Markdown file")
    async def export(self, interaction: discord.Interaction) -> None:
        markdown = await self.engine.export_markdown(self.channel_of(interaction))
        file = discord.File(io.BytesIO(markdown.encode("utf-8")), filename="story.md")
        await interaction.response.send_message("📜 Here is the story so far.", file=file)

    @app_commands.command(
        name="save", description="The story as a file, to load here or anywhere with /story load"
    )
    async def save(self, interaction: discord.Interaction) -> None:
        saved = await self.engine.save_story(self.channel_of(interaction))
        file = discord.File(io.BytesIO(saved.encode("utf-8")), filename="taleweaver-story.json")
        await interaction.response.send_message(
            "💾 The story, saved: `/story load` starts it again, in any channel.", file=file
        )

    @app_commands.command(
        name="import", description="A character card or a lorebook into this story's lore"
    )
    @app_commands.describe(
        file="a SillyTavern character card (JSON or PNG), SillyTavern world info or a "
        "NovelAI lorebook"
    )
    async def import_(self, interaction: discord.Interaction, file: discord.Attachment) -> None:
        if file.size > MAX_LOREBOOK_BYTES:  # before downloading it
            most = f"{MAX_LOREBOOK_BYTES:,}"
            raise InvalidInput(f"That file is too large: at most {most} bytes.")
        await interaction.response.defer(thinking=True)
        raw = await file.read()
        channel = self.channel_of(interaction)
        report = await self.engine.import_lore(channel, raw, by=self.author_of(interaction))
        if not report.started:
            await self.say(interaction, "📚 " + report.describe())
            return
        view = await self.engine.view(channel)  # a card's greeting opened a story
        opening = view.turns[-1]
        header = f"📖 **{view.story.premise}**\n📚 {report.describe()}"
        await edit_reply(
            interaction,
            story_message(opening.text, header=header),
            view=story_controls(view.story.id, opening.position),
        )

    @app_commands.command(name="load", description="Start a saved story in this channel")
    @app_commands.describe(file="a file from /story save")
    async def load(self, interaction: discord.Interaction, file: discord.Attachment) -> None:
        if file.size > MAX_SAVE_BYTES:  # before downloading it
            most = f"{MAX_SAVE_BYTES:,}"
            raise InvalidInput(f"That file is too large: a story file is at most {most} bytes.")
        await interaction.response.defer(thinking=True)
        raw = await file.read()
        view = await self.engine.load_story(
            self.channel_of(interaction),
            raw,
            author=self.author_of(interaction),
            community=self.community_of(interaction),
        )
        bots = [t for t in view.turns if t.kind == "bot"]
        last = view.turns[-1].text if view.turns else ""
        header = f"📂 **{view.story.premise}** ({len(view.turns)} turns loaded)"
        controls = story_controls(view.story.id, bots[-1].position if bots else None)
        await edit_reply(interaction, story_message(last, header=header), view=controls)
        if view.story.mode == "round-robin":
            await interaction.followup.send(
                safe(describe_turn(await self.engine.turn_state(view.story.channel)))
            )

    @app_commands.command(name="end", description="End the story in this channel")
    async def end(self, interaction: discord.Interaction) -> None:
        await in_time(
            interaction,
            self.engine.end_story(self.channel_of(interaction), by=self.author_of(interaction)),
        )
        await self.say(
            interaction,
            "🏁 The story has ended. `/story export` still works; `/story start` begins a new one.",
        )

    # -- notes ----------------------------------------------------------------------

    @app_commands.command(
        name="memory", description="Something the storyteller always keeps in mind"
    )
    @app_commands.describe(
        text="e.g. 'The fox is called Rusty and is afraid of water.' Empty clears it."
    )
    async def memory(
        self, interaction: discord.Interaction, text: app_commands.Range[str, 0, MAX_INPUT] = ""
    ) -> None:
        await in_time(
            interaction,
            self.engine.set_memory(
                self.channel_of(interaction), text, by=self.author_of(interaction)
            ),
        )
        await self.say(interaction, "🧠 Memory set." if text else "🧠 Memory cleared.")

    @app_commands.command(name="note", description="Author's note: steers the next turns")
    @app_commands.describe(text="e.g. 'The mood turns spooky.' Empty clears it.")
    async def note(
        self,
        interaction: discord.Interaction,
        text: app_commands.Range[str, 0, MAX_NOTE_CHARS] = "",
    ) -> None:
        await in_time(
            interaction,
            self.engine.set_authors_note(
                self.channel_of(interaction), text, by=self.author_of(interaction)
            ),
        )
        await self.say(interaction, "✒️ Author's note set." if text else "✒️ Author's note cleared.")

    lore_group = app_commands.Group(
        name="lore", description="Character and place cards, recalled when a trigger word comes up"
    )

    @lore_group.command(
        name="add", description="A character or place, recalled when its trigger words appear"
    )
    @app_commands.describe(
        name="e.g. Rusty",
        triggers="comma-separated words, e.g. 'rusty, fox'",
        text="who or what it is",
    )
    async def lore(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, MAX_LORE_NAME],
        triggers: app_commands.Range[str, 1, 200],
        text: app_commands.Range[str, 1, MAX_INPUT],
    ) -> None:
        card = await in_time(
            interaction,
            self.engine.add_lore(
                self.channel_of(interaction), name, triggers, text, by=self.author_of(interaction)
            ),
        )
        await self.say(
            interaction,
            f"📚 Lore card **{card.name}** saved (triggers: {', '.join(card.triggers)}).",
        )

    @lore_group.command(name="list", description="List this story's lore cards")
    async def lore_list(self, interaction: discord.Interaction) -> None:
        cards = await self.engine.lore(self.channel_of(interaction))
        lines = [f"**{c.name}** ({', '.join(c.triggers)}): {c.text}" for c in cards]
        await self.say(
            interaction,
            "\n".join(lines) or "No lore cards yet: `/story lore add` adds one.",
            ephemeral=True,
        )

    @lore_group.command(name="character", description="The storyteller drafts a character")
    @app_commands.describe(name="their name (or one is chosen)", hint="e.g. 'a shy fox'")
    async def lore_character(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, MAX_LORE_NAME] | None = None,
        hint: app_commands.Range[str, 1, 100] | None = None,
    ) -> None:
        await self.draft(interaction, "character", name, hint)

    @lore_group.command(name="setting", description="The storyteller drafts a place")
    @app_commands.describe(name="its name (or one is chosen)", hint="e.g. 'a foggy marsh'")
    async def lore_setting(
        self,
        interaction: discord.Interaction,
        name: app_commands.Range[str, 1, MAX_LORE_NAME] | None = None,
        hint: app_commands.Range[str, 1, 100] | None = None,
    ) -> None:
        await self.draft(interaction, "setting", name, hint)

    async def draft(
        self, interaction: discord.Interaction, kind: str, name: str | None, hint: str | None
    ) -> None:
        """A drafted card, with Keep / Again / Edit for whoever asked."""
        channel, author = self.channel_of(interaction), self.author_of(interaction)
        await self.engine.check_allowed(channel, author, Action.NOTES)  # before any work
        self.cooldown(interaction)
        await interaction.response.defer(thinking=True)
        icon = "🧑" if kind == "character" else "🏞️"

        async def write() -> LoreCard:
            async with self.bot.work.tracked():
                return await self.engine.draft_card(channel, kind, name=name, hint=hint)

        async def keep(press: discord.Interaction, text: str) -> None:
            kept = await self.engine.add_lore(channel, card.name, card.triggers, text, by=author)
            await update_message(
                press,
                f"📚 Kept: lore card **{kept.name}** (triggers: "
                f"{', '.join(kept.triggers)}).\n{kept.text}",
                view=None,
            )

        async def again(press: discord.Interaction) -> None:
            nonlocal card
            await press.response.defer()
            card = await write()
            controls.text = card.text
            await press.edit_original_response(
                content=safe(f"{icon} **{card.name}**\n{card.text}"), view=controls
            )

        card = await write()
        controls = CardDraftView(interaction.user.id, keep, again, card.text)
        await edit_reply(interaction, f"{icon} **{card.name}**\n{card.text}", view=controls)

    @lore_group.command(name="export", description="This story's lore as SillyTavern world info")
    async def lore_export(self, interaction: discord.Interaction) -> None:
        data = await self.engine.lore_as_world_info(self.channel_of(interaction))
        file = discord.File(io.BytesIO(data.encode("utf-8")), filename="taleweaver-lore.json")
        await interaction.response.send_message(
            "📚 The lore as SillyTavern world info (`/story import` takes it back).", file=file
        )

    @lore_group.command(name="remove", description="Remove a lore card")
    async def lore_remove(
        self, interaction: discord.Interaction, name: app_commands.Range[str, 1, MAX_LORE_NAME]
    ) -> None:
        await in_time(
            interaction,
            self.engine.remove_lore(
                self.channel_of(interaction), name, by=self.author_of(interaction)
            ),
        )
        await self.say(interaction, f"📚 Lore card {quoted(name)} removed.")

    @lore_remove.autocomplete("name")
    async def _lore_names(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        try:
            cards = await self.engine.lore(self.channel_of(interaction))
        except StoryError:
            return []
        return [
            app_commands.Choice(name=c.name, value=c.name)
            for c in cards
            if current.lower() in c.name.lower()
        ][:25]

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
        interaction: discord.Interaction,
        preset: PresetName | None = None,
        temperature: app_commands.Range[float, 0.0, 2.0] | None = None,
        length: app_commands.Range[int, 16, 400] | None = None,
        turn_timeout: app_commands.Range[int, TURN_TIMEOUT[0], TURN_TIMEOUT[1]] | None = None,
        best_of: app_commands.Range[int, 1, MAX_BEST_OF] | None = None,
    ) -> None:
        channel, author = self.channel_of(interaction), self.author_of(interaction)
        if turn_timeout is not None:
            await in_time(
                interaction, self.engine.set_turn_timeout(channel, turn_timeout, by=author)
            )
        params = await in_time(
            interaction,
            self.engine.configure_channel(
                channel,
                preset_name=preset,
                temperature=temperature,
                max_new_tokens=length,
                by=author,
                best_of=best_of,
            ),
        )
        style = "beam search" if params.beam_search else f"temperature {params.temperature}"
        await self.say(
            interaction,
            f"⚙️ {style}, length {params.max_new_tokens} tokens, best of {params.best_of}"
            + (f", turns pass after {turn_timeout} s" if turn_timeout else "")
            + ".",
        )

    # -- round-robin --------------------------------------------------------------

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

    # -- the rest -------------------------------------------------------------------

    @app_commands.command(name="idea", description="Suggest a premise to start from")
    async def idea(
        self,
        interaction: discord.Interaction,
        genre: app_commands.Range[str, 1, MAX_GENRE_CHARS] | None = None,
    ) -> None:
        self.cooldown(interaction)
        await interaction.response.defer(thinking=True)
        async with self.bot.work.tracked():
            premise = await self.engine.suggest_premise(genre)
            await edit_reply(
                interaction, f"💡 {premise}\n\nStart it with `/story start premise:...`."
            )

    @app_commands.command(name="help", description="What the storyteller can do")
    async def help(self, interaction: discord.Interaction) -> None:
        await self.say(interaction, HELP, ephemeral=True)

    @app_commands.command(name="privacy", description="What is stored about you, and why")
    async def privacy(self, interaction: discord.Interaction) -> None:
        await self.say(interaction, PRIVACY, ephemeral=True)

    @app_commands.command(name="my-data", description="Download everything stored about you")
    async def my_data(self, interaction: discord.Interaction) -> None:
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
    async def forget_me(self, interaction: discord.Interaction) -> None:
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
