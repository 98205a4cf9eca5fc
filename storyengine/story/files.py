"""A story as text and as a file: the recap, Markdown export, and save and load
(`saves`' format), which moves a story to another channel or server.
"""

from __future__ import annotations

import logging

from ..config import MAX_GENRE_CHARS, MAX_LORE_NAME, MAX_NOTE_CHARS
from ..errors import InvalidInput, StoryAlreadyRunning
from ..records import Author
from ..safety import clean_id, clean_name, normalize_text
from ..sampling import preset
from ..saves import SavedLore, SavedStory, SavedTurn, parse
from ..storage import StoryRecords
from .games import RoundRobin
from .memory import StoryMaterial
from .render import render_markdown, render_recap
from .stories import Stories, StoryView

log = logging.getLogger(__name__)


class StoryFiles:
    def __init__(self, stories: Stories, games: RoundRobin) -> None:
        self.stories = stories
        self.store: StoryRecords = stories.store
        self.games = games

    async def recap(self, channel: str) -> str:
        view = await self.stories.view(channel)
        return render_recap(view.story, view.turns)

    async def export_markdown(self, channel: str) -> str:
        """The active story (or, if none, the channel's last one) as Markdown."""
        story = await self.stories.active_or_latest(channel)
        return render_markdown(
            story, await self.store.active_turns(story.id), await self.store.lore(story.id)
        )

    async def save_story(self, channel: str) -> str:
        """The active story (or, if none, the channel's last one) as a story file (JSON,
        `saves`): premise, style, notes, lore, and the turns with their alternatives."""
        story = await self.stories.active_or_latest(channel)
        turns = []
        for turn in await self.store.active_turns(story.id):
            others = []
            if turn.kind == "bot":
                others = [
                    t.text
                    for t in await self.store.alternatives(story.id, turn.position)
                    if t.id != turn.id
                ]
            author = turn.author_name if turn.kind == "user" else None
            turns.append(SavedTurn(turn.kind, turn.text, author, tuple(others[-16:])))
        preset_name, sampling = await self.store.channel_settings(story.channel)
        lore = [SavedLore(c.name, c.triggers, c.text) for c in await self.store.lore(story.id)]
        return SavedStory(
            story.premise,
            story.genre,
            story.mode,
            story.memory,
            story.authors_note,
            preset_name,
            sampling,
            tuple(lore),
            tuple(turns),
        ).to_json()

    async def load_story(
        self,
        channel: str,
        raw: bytes | str,
        *,
        author: Author,
        community: str | None = None,
    ) -> StoryView:
        """Start a saved story (`save_story`'s file) in this channel: every field checked
        first, then stored in one transaction. A round-robin game starts with whoever
        loads it seated."""
        saved = parse(raw, max_text=self.stories.settings.max_input_chars)
        clean = self.stories.safety.clean_input

        def text(value: str, what: str, limit: int, *, required: bool = True) -> str:
            return clean(value, what=what, required=required, limit=limit)

        def story_text(value: str, what: str) -> str:
            """A turn: as long as the file allows (a reply may be longer than what a
            person may type at once), cleaned as any text is."""
            cleaned = self.stories.safety.strip_control_tokens(normalize_text(value).strip())
            if not cleaned:
                raise InvalidInput(f"{what} is empty.")
            return cleaned

        try:
            params = preset(saved.preset).params if saved.preset else self.stories.settings.sampling
            params.replace(**saved.sampling)
        except (InvalidInput, TypeError) as exc:
            raise InvalidInput(f'"settings": {exc}') from None
        saved = SavedStory(
            text(saved.premise, "The premise", len(saved.premise) or 1),
            text(saved.genre or "", "The genre", MAX_GENRE_CHARS, required=False) or None,
            saved.mode,
            text(saved.memory, "The memory", len(saved.memory) or 1, required=False),
            text(saved.authors_note, "The author's note", MAX_NOTE_CHARS, required=False),
            saved.preset,
            saved.sampling,
            tuple(
                SavedLore(
                    " ".join(text(c.name, "A card's name", MAX_LORE_NAME).split()),
                    tuple(w for w in (" ".join(t.split()) for t in c.triggers) if w) or (c.name,),
                    text(c.text, "A card's text", MAX_NOTE_CHARS),
                )
                for c in saved.lore
            ),
            tuple(
                SavedTurn(
                    t.kind,
                    story_text(t.text, "A turn"),
                    clean_name(t.author) if t.author else None,
                    tuple(story_text(a, "An alternative") for a in t.alternatives),
                )
                for t in saved.turns
            ),
        )
        self.stories.builder(params).check_fits(
            StoryMaterial(saved.premise, (), saved.genre, saved.memory, saved.authors_note)
        )
        loader = await self.stories.who(author)
        channel = clean_id(channel, "The channel")
        async with self.stories.lock(channel):
            if await self.store.active_story(channel) is not None:
                raise StoryAlreadyRunning(channel)
            story = await self.store.import_story(
                channel, saved, loaded_by=loader.id, community=community
            )
            if story.mode == "round-robin":
                await self.games.seat(story, loader)
            log.info("story %d loaded in %s (%d turns)", story.id, channel, len(saved.turns))
        return await self.stories.view(channel)
