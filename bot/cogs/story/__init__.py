"""`/story ...`: every story command, and the story buttons' actions.

One `/story` group, written by concern: telling.py, notes.py (notes, lore, files),
games.py (round-robin), pictures.py (illustrations), privacy.py; base.py holds what
they share. Handlers validate, call the engine, and render; the story logic lives in
the engine. Anything that generates text defers first (Discord's 3-second deadline)
and streams.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from discord.ext import commands

from .base import StoryCommands
from .games import Games
from .notes import NotesAndLore
from .pictures import Pictures
from .privacy import Privacy
from .telling import Telling

if TYPE_CHECKING:
    from ...client import StoryBot

__all__ = ["StoryCog"]


class StoryCog(
    Telling,
    NotesAndLore,
    Pictures,
    Games,
    Privacy,
    StoryCommands,
    commands.GroupCog,
    group_name="story",
    group_description="Tell a story together",
):
    def __init__(self, bot: StoryBot) -> None:
        StoryCommands.__init__(self, bot)
        commands.GroupCog.__init__(self)
