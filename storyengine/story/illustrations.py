"""Pictures for a story's turns: the prompt is written here, from the turn and the lore
it calls up, and drawn by the configured backend (`storyengine.serving.images`).

A text-to-image model reads a short description best, the most important words first
(CLIP-based pipelines read 77 tokens at most): the turn's first sentences, then who and
where from the lore cards the turn names (a line each), then the story's genre and the
style (`STORY_IMAGE_STYLE`). The prompt passes the same safety filter as model text
(blocked words are dropped) before any backend sees it, and is shown with the picture.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import IllustrationsOff, InvalidInput
from ..records import Author, LoreCard, Story, Turn
from ..serving.images import Picture, PictureBackend, PictureRequest, Progress
from ..text import split_sentences
from .permissions import Action
from .stories import Stories

SCENE_CHARS = 260
"""Longest scene description taken from the turn (about two sentences)."""
CARD_CHARS = 90
MAX_CARDS = 3


@dataclass(frozen=True)
class PictureOrder:
    """A picture about to be drawn: checked (who asks, which turn) and its prompt written."""

    prompt: str
    """The prompt as the backend reads it (filtered): show it with the picture."""
    turn: int
    """Which turn, counted from 1 as `/story illustrate` counts them."""
    turns: int
    """How many turns the story has."""


@dataclass(frozen=True)
class Illustration:
    order: PictureOrder
    picture: Picture


def picture_prompt(
    story: Story, turn: Turn, lore: list[LoreCard], style: str, before: Turn | None = None
) -> str:
    """What the picture for `turn` is drawn from (before the safety filter). `before`,
    the turn before it, is scanned for lore too ("he" in a turn is often the fox the
    turn before named), after the turn's own."""
    scene = ""
    for sentence in split_sentences(turn.text) or [turn.text]:
        if scene and len(scene) + len(sentence) + 1 > SCENE_CHARS:
            break
        scene = f"{scene} {sentence}".strip()
    if len(scene) > SCENE_CHARS:
        scene = scene[:SCENE_CHARS].rsplit(" ", 1)[0]
    named = [c for c in lore if c.triggered_by(turn.text)]
    if before is not None:
        named += [c for c in lore if c not in named and c.triggered_by(before.text)]
    parts = [scene]
    for card in named[:MAX_CARDS]:
        about = (split_sentences(card.text) or [card.text])[0]
        parts.append(f"{card.name}: {about}"[:CARD_CHARS])
    if story.genre:
        parts.append(f"a {story.genre} story")
    if style:
        parts.append(style)
    parts = [p.strip().rstrip(" .,;") for p in parts if p.strip(" .,;")]
    return ". ".join(p[0].upper() + p[1:] for p in parts) + "."


class Illustrator:
    def __init__(self, stories: Stories) -> None:
        self.stories = stories
        self.backend: PictureBackend | None = None
        """Set by the engine's start when STORY_IMAGE_MODEL or STORY_IMAGE_URL is."""

    async def order_picture(
        self, channel: str, turn: int | None = None, *, by: Author | None = None
    ) -> PictureOrder:
        """Check that a picture for turn `turn` (counted from 1; default the last) may be
        drawn, by whoever asks (anyone who may play the story), and write its prompt.
        `IllustrationsOff` when no backend is configured. Nothing is drawn yet: a front
        end calls this first, so that a refusal comes before any "drawing..." reply."""
        if self.backend is None:
            raise IllustrationsOff()
        story = await self.stories.active(channel)
        await self.stories.allow(story, await self.stories.actor(by), Action.ILLUSTRATE)
        turns = await self.stories.store.active_turns(story.id)
        if not turns:
            raise InvalidInput("This story has no turns yet to draw.")
        number = len(turns) if turn is None else turn
        if not 1 <= number <= len(turns):
            many = f"{len(turns)} turn{'s' if len(turns) != 1 else ''}"
            raise InvalidInput(f"This story has {many}: pick a turn from 1 to {len(turns)}.")
        lore = await self.stories.store.lore(story.id)
        before = turns[number - 2] if number > 1 else None
        style = self.stories.settings.image_style
        prompt = picture_prompt(story, turns[number - 1], lore, style, before)
        prompt = self.stories.safety.clean_picture_prompt(prompt)
        if not prompt.strip(" ."):
            raise InvalidInput(f"Nothing in turn {number} can be drawn: pick another.")
        return PictureOrder(prompt, number, len(turns))

    async def draw_picture(
        self, order: PictureOrder, *, on_progress: Progress | None = None
    ) -> Illustration:
        """Draw an ordered picture (`on_progress(step, steps)` as it goes)."""
        if self.backend is None:
            raise IllustrationsOff()
        settings = self.stories.settings
        size = settings.image_size
        request = PictureRequest(order.prompt, size, size, settings.image_steps)
        return Illustration(order, await self.backend.draw(request, on_progress=on_progress))

    async def illustrate(
        self,
        channel: str,
        turn: int | None = None,
        *,
        by: Author | None = None,
        on_progress: Progress | None = None,
    ) -> Illustration:
        """`order_picture` then `draw_picture`: a picture for turn `turn` (default the last)."""
        order = await self.order_picture(channel, turn, by=by)
        return await self.draw_picture(order, on_progress=on_progress)
