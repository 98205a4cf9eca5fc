"""Notes and lore: memory, author's note, lore cards (typed, drafted, imported,
exported), and stories saved to and loaded from files."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING

import discord
from discord import app_commands

from storyengine import MAX_LOREBOOK_BYTES, MAX_SAVE_BYTES, Action
from storyengine.config import (
    MAX_LORE_NAME,
    MAX_NOTE_CHARS,
)
from storyengine.errors import InvalidInput, StoryError
from storyengine.records import LoreCard
from storyengine.safety import quoted

from ...publish import (
    edit_reply,
    safe,
    update_message,
)
from ...render import describe_turn, story_message
from ...views import CardDraftView, story_controls
from .base import MAX_INPUT, StoryCommands

if TYPE_CHECKING:
    from ...client import StoryBot


class NotesAndLore(StoryCommands):
    @app_commands.command(
        name="memory", description="Something the storyteller always keeps in mind"
    )
    @app_commands.describe(
        text="e.g. 'The fox is called Rusty and is afraid of water.' Empty clears it."
    )
    async def memory(
        self,
        interaction: discord.Interaction[StoryBot],
        text: app_commands.Range[str, 0, MAX_INPUT] = "",
    ) -> None:
        await self.act(interaction, self.engine.set_memory, text)
        await self.say(interaction, "🧠 Memory set." if text else "🧠 Memory cleared.")

    @app_commands.command(name="note", description="Author's note: steers the next turns")
    @app_commands.describe(text="e.g. 'The mood turns spooky.' Empty clears it.")
    async def note(
        self,
        interaction: discord.Interaction[StoryBot],
        text: app_commands.Range[str, 0, MAX_NOTE_CHARS] = "",
    ) -> None:
        await self.act(interaction, self.engine.set_authors_note, text)
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
        interaction: discord.Interaction[StoryBot],
        name: app_commands.Range[str, 1, MAX_LORE_NAME],
        triggers: app_commands.Range[str, 1, 200],
        text: app_commands.Range[str, 1, MAX_INPUT],
    ) -> None:
        card = await self.act(interaction, self.engine.add_lore, name, triggers, text)
        await self.say(
            interaction,
            f"📚 Lore card **{card.name}** saved (triggers: {', '.join(card.triggers)}).",
        )

    @lore_group.command(name="list", description="List this story's lore cards")
    async def lore_list(self, interaction: discord.Interaction[StoryBot]) -> None:
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
        interaction: discord.Interaction[StoryBot],
        name: app_commands.Range[str, 1, MAX_LORE_NAME] | None = None,
        hint: app_commands.Range[str, 1, 100] | None = None,
    ) -> None:
        await self.draft(interaction, "character", name, hint)

    @lore_group.command(name="setting", description="The storyteller drafts a place")
    @app_commands.describe(name="its name (or one is chosen)", hint="e.g. 'a foggy marsh'")
    async def lore_setting(
        self,
        interaction: discord.Interaction[StoryBot],
        name: app_commands.Range[str, 1, MAX_LORE_NAME] | None = None,
        hint: app_commands.Range[str, 1, 100] | None = None,
    ) -> None:
        await self.draft(interaction, "setting", name, hint)

    async def draft(
        self,
        interaction: discord.Interaction[StoryBot],
        kind: str,
        name: str | None,
        hint: str | None,
    ) -> None:
        """A drafted card, with Keep / Again / Edit for whoever asked."""
        channel, author = self.channel_and_author(interaction)
        await self.engine.check_allowed(channel, author, Action.NOTES)  # before any work
        await self.begin_writing(interaction)
        icon = "🧑" if kind == "character" else "🏞️"

        async def write() -> LoreCard:
            async with self.bot.work.tracked():
                return await self.engine.draft_card(channel, kind, name=name, hint=hint)

        async def keep(press: discord.Interaction[StoryBot], text: str) -> None:
            kept = await self.engine.add_lore(channel, card.name, card.triggers, text, by=author)
            await update_message(
                press,
                f"📚 Kept: lore card **{kept.name}** (triggers: "
                f"{', '.join(kept.triggers)}).\n{kept.text}",
                view=None,
            )

        async def again(press: discord.Interaction[StoryBot]) -> None:
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
    async def lore_export(self, interaction: discord.Interaction[StoryBot]) -> None:
        data = await self.engine.lore_as_world_info(self.channel_of(interaction))
        file = discord.File(io.BytesIO(data.encode("utf-8")), filename="taleweaver-lore.json")
        await interaction.response.send_message(
            "📚 The lore as SillyTavern world info (`/story import` takes it back).", file=file
        )

    @lore_group.command(name="remove", description="Remove a lore card")
    async def lore_remove(
        self,
        interaction: discord.Interaction[StoryBot],
        name: app_commands.Range[str, 1, MAX_LORE_NAME],
    ) -> None:
        await self.act(interaction, self.engine.remove_lore, name)
        await self.say(interaction, f"📚 Lore card {quoted(name)} removed.")

    @lore_remove.autocomplete("name")
    async def _lore_names(
        self, interaction: discord.Interaction[StoryBot], current: str
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

    @app_commands.command(
        name="import", description="A character card or a lorebook into this story's lore"
    )
    @app_commands.describe(
        file="a SillyTavern character card (JSON or PNG), SillyTavern world info or a "
        "NovelAI lorebook"
    )
    async def import_(
        self, interaction: discord.Interaction[StoryBot], file: discord.Attachment
    ) -> None:
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

    @app_commands.command(
        name="save", description="The story as a file, to load here or anywhere with /story load"
    )
    async def save(self, interaction: discord.Interaction[StoryBot]) -> None:
        saved = await self.engine.save_story(self.channel_of(interaction))
        file = discord.File(io.BytesIO(saved.encode("utf-8")), filename="taleweaver-story.json")
        await interaction.response.send_message(
            "💾 The story, saved: `/story load` starts it again, in any channel.", file=file
        )

    @app_commands.command(name="load", description="Start a saved story in this channel")
    @app_commands.describe(file="a file from /story save")
    async def load(
        self, interaction: discord.Interaction[StoryBot], file: discord.Attachment
    ) -> None:
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
