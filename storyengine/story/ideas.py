"""Ideas from the storyteller: a premise to start from, and character and setting cards
drafted one sentence at a time.
"""

from __future__ import annotations

from ..config import MAX_GENRE_CHARS, MAX_NOTE_CHARS
from ..errors import InvalidInput
from ..records import LoreCard
from ..sampling import SamplingParams
from ..storage import StoryRecords
from ..text import split_sentences
from .memory import StoryMaterial
from .notes import Notes
from .stories import Stories

CARD_LEADS = {
    "character": ("{subject} looked", "{subject} wanted", "{subject} always"),
    "setting": ("{subject} was", "It felt", "In the middle of it, there was"),
}
"""How a drafted card's sentences begin (`draft_card`): a story model continues
sentences, it does not fill in forms."""
CARD_NAMES = {
    "character": ("Pip", "Mira", "Tobin", "Wren", "Juno", "Bram", "Lulu", "Otto"),
    "setting": ("Old Mill", "Willow Pond", "Hilltop", "Lantern Market", "Deep Wood"),
}
"""Names for a card drafted without one."""


class Ideas:
    def __init__(self, stories: Stories, notes: Notes) -> None:
        self.stories = stories
        self.store: StoryRecords = stories.store
        self.notes = notes

    def opening_prompt(self, premise: str, params: SamplingParams | None = None) -> str:
        """The prompt a new story with `premise` opens with (what `start_story` hands
        the model): for benchmarks and tools that sample openings themselves."""
        params = params or self.stories.settings.sampling
        return self.stories.builder(params).build(StoryMaterial(premise, ())).text

    async def suggest_premise(self, genre: str | None = None) -> str:
        """A premise to start from: the storyteller's own first sentence of a new tale."""
        genre = self.stories.safety.clean_input(
            genre, what="The genre", required=False, limit=MAX_GENRE_CHARS
        )
        opening = f"Once upon a time, in a {genre} land," if genre else "Once upon a time,"
        params = self.stories.settings.sampling.replace(
            max_new_tokens=40, num_beams=1, temperature=0.9
        )
        narration = await self.stories.narrator.narrate(opening, params, channel="ideas")
        first = split_sentences(narration.text)[:1]
        return self.stories.safety.clean_output(
            f"{opening} {first[0] if first else narration.text}"
        )

    async def draft_card(
        self,
        channel: str,
        kind: str,
        *,
        name: str | None = None,
        hint: str | None = None,
    ) -> LoreCard:
        """A character (appearance, what they want, a quirk) or a setting (the place, its
        mood, a detail) for the channel's story, written by the storyteller one sentence
        at a time after the story's premise; not stored (`add_lore` keeps it)."""
        if kind not in CARD_LEADS:
            raise InvalidInput("A card is a character or a setting.")
        card_name = self.notes.card_name(name, what="The name", required=False)
        hint = self.stories.safety.clean_input(hint, what="The hint", required=False, limit=100)
        story = await self.stories.active(channel)
        if not card_name:
            taken = {c.name.lower() for c in await self.store.lore(story.id)}
            choices = [n for n in CARD_NAMES[kind] if n.lower() not in taken] or CARD_NAMES[kind]
            card_name = choices[len(taken) % len(choices)]
        subject = (
            card_name if kind == "character" else f"The {card_name.lower().removeprefix('the ')}"
        )
        context = story.premise + (f" {hint.rstrip('.')}." if hint else "")
        params = (await self.stories.sampling_for(channel)).replace(
            max_new_tokens=28, num_beams=1, temperature=0.9, best_of=1, seed=None
        )
        sentences: list[str] = []
        for lead in CARD_LEADS[kind]:
            lead = lead.format(subject=subject)
            prompt = "\n".join([context, " ".join(sentences), lead]).replace("\n\n", "\n")
            narration = await self.stories.narrator.narrate(
                prompt, params, channel=f"{channel}:cards"
            )
            first = split_sentences(narration.text)[:1]
            if first:
                sentences.append(f"{lead} {first[0]}")
        text = self.stories.safety.clean_output(" ".join(sentences)) or f"{subject}."
        while len(text) > MAX_NOTE_CHARS and len(sentences) > 1:
            sentences.pop()
            text = self.stories.safety.clean_output(" ".join(sentences))
        return self.notes.lore_card(card_name, [card_name], text[:MAX_NOTE_CHARS])
