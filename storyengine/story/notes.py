"""What a story is told with: the channel's style, the memory and the author's note, lore
cards (typed, drafted or imported from cards and lorebooks), and the context viewer that
shows how they fill the model's window.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

from ..config import MAX_LORE_CARDS, MAX_LORE_NAME, MAX_NOTE_CHARS, MAX_TRIGGER_CHARS, MAX_TRIGGERS
from ..errors import InvalidInput
from ..records import Author, ImportReport, LoreCard, Story
from ..safety import clean_id, quoted
from ..sampling import SamplingParams, preset
from ..storage import TellingRecords
from .files import StoryFiles
from .memory import ContextView
from .permissions import Action
from .stories import Stories


class Notes:
    def __init__(self, stories: Stories, files: StoryFiles) -> None:
        self.stories = stories
        self.store: TellingRecords = stories.store
        self.files = files

    async def configure_channel(
        self,
        channel: str,
        *,
        preset_name: str | None = None,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        by: Author | None = None,
        **more: Any,
    ) -> SamplingParams:
        """Set the channel's preset and/or parameter overrides. Choosing a preset clears
        earlier overrides. Returns the resulting parameters. While a story runs here,
        only those its rules allow may change them."""
        channel = clean_id(channel, "The channel")
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.store.active_story(channel)
            if story is not None:
                await self.stories.allow(story, actor, Action.SETTINGS)
            current_preset, saved = await self.store.channel_settings(channel)
            if preset_name is not None:
                preset(preset_name)  # validates
                current_preset, saved = preset_name.strip().lower(), {}
            changes = {"temperature": temperature, "max_new_tokens": max_new_tokens, **more}
            saved = {**saved, **{k: v for k, v in changes.items() if v is not None}}
            base = (
                preset(current_preset).params if current_preset else self.stories.settings.sampling
            )
            try:
                params = base.replace(**saved)  # validates the combination
            except TypeError:
                raise InvalidInput(f"Unknown setting among {sorted(changes)}.") from None
            await self.store.set_channel_settings(channel, current_preset, saved)
            return params

    async def set_memory(self, channel: str, text: str, *, by: Author | None = None) -> Story:
        return await self._set_note(channel, "memory", text, "The memory", by)

    async def set_authors_note(self, channel: str, text: str, *, by: Author | None = None) -> Story:
        return await self._set_note(channel, "authors_note", text, "The author's note", by)

    async def _set_note(
        self, channel: str, field: str, text: str, what: str, by: Author | None
    ) -> Story:
        limit = MAX_NOTE_CHARS if field == "authors_note" else None
        cleaned = self.stories.safety.clean_input(text, what=what, required=False, limit=limit)
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, actor, Action.NOTES)
            material = self.stories.material(story, [], [])
            material = dataclasses.replace(material, **{field: cleaned})
            self.stories.builder(await self.stories.sampling_for(channel)).check_fits(material)
            await self.store.update_story(story.id, **{field: cleaned})
            return await self.stories.active(channel)

    async def add_lore(
        self,
        channel: str,
        name: str,
        triggers: list[str] | str,
        text: str,
        *,
        by: Author | None = None,
    ) -> LoreCard:
        """Add or replace a lore card. `triggers` may be a comma-separated string."""
        card = self.lore_card(name, triggers, text)
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, actor, Action.NOTES)
            existing = await self.store.lore(story.id)
            if len(existing) >= MAX_LORE_CARDS and card.name.lower() not in {
                c.name.lower() for c in existing
            }:
                raise InvalidInput(f"A story may have at most {MAX_LORE_CARDS} lore cards.")
            await self.store.upsert_lore(story.id, card)
        return card

    def card_name(
        self, name: str | None, *, what: str = "The card's name", required: bool = True
    ) -> str:
        """A card's name as typed: checked, cleaned, its spaces collapsed."""
        cleaned = self.stories.safety.clean_input(
            name, what=what, required=required, limit=MAX_LORE_NAME
        )
        return " ".join(cleaned.split())

    def lore_card(
        self, name: str, triggers: list[str] | tuple[str, ...] | str, text: str
    ) -> LoreCard:
        """A lore card made of what someone typed or imported: checked and cleaned."""
        name = self.card_name(name)
        if isinstance(triggers, str):
            triggers = triggers.split(",")
        if len(triggers) > 100:
            raise InvalidInput(f"Give at most {MAX_TRIGGERS} trigger words.")
        words = tuple(
            dict.fromkeys(
                " ".join(
                    self.stories.safety.clean_input(
                        t, what="A trigger word", required=False, limit=MAX_TRIGGER_CHARS
                    ).split()
                )
                for t in triggers
            )
        )
        words = tuple(w for w in words if w) or (name,)
        if len(words) > MAX_TRIGGERS:
            raise InvalidInput(
                f"Give at most {MAX_TRIGGERS} trigger words, each at most "
                f"{MAX_TRIGGER_CHARS} characters."
            )
        body = self.stories.safety.clean_input(text, what="The card's text", limit=MAX_NOTE_CHARS)
        return LoreCard(name, words, body)

    async def import_lore(
        self, channel: str, raw: bytes, *, by: Author | None = None
    ) -> ImportReport:
        """A SillyTavern character card (JSON or PNG) or world info, or a NovelAI
        lorebook, into the story: its entries become lore cards (replacing cards of the
        same name), and a character card's personality and scenario become the memory
        when the story has none. Everything is checked first; it lands whole or not."""
        from .lorebooks import fill_names, read

        found = read(raw)
        user = by.name if by is not None and by.name else "you"

        def filled(text: str) -> str:
            return fill_names(text, found.character, user)

        cards = [self.lore_card(c.name, c.triggers, filled(c.text)) for c in found.cards]
        memory = self.stories.safety.clean_input(
            filled(found.memory), what="The card's memory", required=False
        )
        if found.greeting and await self.stories.find(channel) is None:
            return await self._start_from_card(channel, found, cards, memory, filled, by)
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, actor, Action.NOTES)
            names = {c.name.lower() for c in await self.store.lore(story.id)}
            names |= {c.name.lower() for c in cards}
            if len(names) > MAX_LORE_CARDS:
                raise InvalidInput(
                    f"With this file the story would have {len(names)} lore cards; a story "
                    f"may have at most {MAX_LORE_CARDS}."
                )
            set_memory = bool(memory) and not story.memory
            if set_memory:
                material = self.stories.material(story, [], [])
                self.stories.builder(await self.stories.sampling_for(channel)).check_fits(
                    dataclasses.replace(material, memory=memory)
                )
            await self.store.import_lore(story.id, cards, memory if set_memory else None)
        return ImportReport(
            found.kind,
            [c.name for c in cards],
            set_memory,
            bool(memory) and not set_memory,
            found.shortened,
            found.skipped,
        )

    async def _start_from_card(
        self,
        channel: str,
        found: Any,
        cards: list[LoreCard],
        memory: str,
        filled: Callable[[str], str],
        by: Author | None,
    ) -> ImportReport:
        """No story here yet: a character card starts one, its scenario the premise
        (else a line naming the character), its greeting (`first_mes`) the opening."""
        from ..saves import SavedLore, SavedStory, SavedTurn

        premise = filled(found.scenario) or f"A story with {found.character}."
        premise = self.stories.safety.clean_input(premise, what="The card's scenario")
        saved = SavedStory(
            premise,
            memory=memory,
            lore=tuple(SavedLore(c.name, c.triggers, c.text) for c in cards),
            turns=(SavedTurn("bot", filled(found.greeting)),),
        )
        await self.files.load_story(
            channel, saved.to_json(), author=by or Author("operator", "You")
        )
        return ImportReport(
            found.kind,
            [c.name for c in cards],
            bool(memory),
            False,
            found.shortened,
            found.skipped,
            started=True,
        )

    async def lore_as_world_info(self, channel: str) -> str:
        """The story's lore as SillyTavern world info JSON."""
        from .lorebooks import world_info

        return world_info(await self.lore(channel))

    async def remove_lore(self, channel: str, name: str, *, by: Author | None = None) -> None:
        name = self.card_name(name)
        actor = await self.stories.actor(by)
        async with self.stories.lock(channel):
            story = await self.stories.active(channel)
            await self.stories.allow(story, actor, Action.NOTES)
            if not await self.store.remove_lore(story.id, name):
                raise InvalidInput(f"There is no lore card named {quoted(name)}.")

    async def lore(self, channel: str) -> list[LoreCard]:
        story = await self.stories.active(channel)
        return await self.store.lore(story.id)

    async def context(self, channel: str) -> ContextView:
        """What the model saw for the story's last reply, each part marked with its
        tokens against its budget (NovelAI's context viewer)."""
        story = await self.stories.active(channel)
        turns = await self.store.active_turns(story.id)
        last = next((t for t in reversed(turns) if t.kind == "bot"), None)
        record = (
            await self.store.generation(last.generation_id)
            if last is not None and last.generation_id is not None
            else None
        )
        if last is None or record is None:
            raise InvalidInput("The storyteller has not written anything in this story yet.")
        params = await self.stories.sampling_for(channel)
        written = record.get("params") or {}
        if written.get("max_new_tokens"):  # the reply's own length set the room left
            params = params.replace(max_new_tokens=int(written["max_new_tokens"]))
        before = turns[: turns.index(last)]
        material = self.stories.material(story, before, await self.store.lore(story.id))
        built = self.stories.builder(params).build(material)
        window = self.stories.narrator.info.context_window
        stored = str(record["prompt"])
        return ContextView(
            built.sections,
            built.tokens,
            window,
            params.max_new_tokens,
            stored == built.text,
            stored,
        )
