"""Buttons. Story buttons are dynamic items: their state lives in the custom id, so
they keep working after the bot restarts."""

from __future__ import annotations

import re
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any, ClassVar, Self

import discord

if TYPE_CHECKING:
    from .client import StoryBot
    from .cogs.story import StoryCog


def _cog(interaction: discord.Interaction[StoryBot]) -> StoryCog:
    """The `/story` commands, whose actions the story buttons share."""
    cog = interaction.client.story_commands
    if cog is None:
        raise RuntimeError("the /story commands are not loaded")
    return cog


StoryAction = tuple[Callable[..., Awaitable[None]], *tuple[Any, ...]]
"""A `/story` action (as `StoryCog.run_guarded` runs it), then its arguments after the
interaction."""


class StoryButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]], template=r"tw:story(?::(?P<story>\d+))?"
):
    """A button bound to its message's story, which runs a `/story` action on it.
    (Messages from before story ids were put on buttons carry none: they act on whatever
    story the channel tells.) A subclass names its custom id's `prefix` and its look;
    this class's own template is never registered."""

    prefix: ClassVar[str]
    look: ClassVar[dict[str, Any]]
    """The `discord.ui.Button`'s label, style and emoji."""

    def __init_subclass__(cls, *, prefix: str, **look: Any) -> None:
        super().__init_subclass__(template=rf"{prefix}(?::(?P<story>\d+))?")
        cls.prefix, cls.look = prefix, look

    def __init__(self, story_id: int | None) -> None:
        self.story_id = story_id
        custom_id = _with_story(self.prefix, story_id)
        super().__init__(discord.ui.Button(custom_id=custom_id, **self.look))

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[StoryBot], item: Any, match: re.Match[str]
    ) -> Self:
        return cls(_story_of(match))

    async def callback(self, interaction: discord.Interaction[StoryBot]) -> None:
        cog = _cog(interaction)
        await cog.run_guarded(interaction, *self.action(cog))

    def action(self, cog: StoryCog) -> StoryAction:
        """What a press runs."""
        raise NotImplementedError


class ContinueButton(
    StoryButton,
    prefix="tw:continue",
    label="Continue",
    style=discord.ButtonStyle.primary,
    emoji="▶️",
):
    """Continue the story the message belongs to."""

    def action(self, cog: StoryCog) -> StoryAction:
        return cog.do_continue, None, self.story_id


class RetryButton(
    StoryButton, prefix="tw:retry", label="Retry", style=discord.ButtonStyle.secondary, emoji="🔁"
):
    """Write the last turn of the message's story again."""

    def action(self, cog: StoryCog) -> StoryAction:
        return cog.do_retry, self.story_id


class SwipeButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"tw:swipe:(?P<story>\d+):(?P<position>\d+):(?P<step>prev|next)",
):
    """◀ or ▶ on the storyteller's reply: page through its alternatives in place."""

    def __init__(self, story_id: int, position: int, step: str) -> None:
        self.story_id, self.position, self.step = story_id, position, step
        super().__init__(
            discord.ui.Button(
                style=discord.ButtonStyle.secondary,
                custom_id=f"tw:swipe:{story_id}:{position}:{step}",
                emoji="◀️" if step == "prev" else "▶️",
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[StoryBot], item: Any, match: re.Match[str]
    ) -> SwipeButton:
        return cls(int(match["story"]), int(match["position"]), match["step"])

    async def callback(self, interaction: discord.Interaction[StoryBot]) -> None:
        cog = _cog(interaction)
        step = -1 if self.step == "prev" else 1
        await cog.run_guarded(interaction, cog.do_swipe, self.story_id, self.position, step)


def _with_story(prefix: str, story_id: int | None) -> str:
    return prefix if story_id is None else f"{prefix}:{story_id}"


def _story_of(match: re.Match[str]) -> int | None:
    return int(match["story"]) if match["story"] else None


class ChoiceButton(
    discord.ui.DynamicItem[discord.ui.Button[Any]],
    template=r"tw:choice:(?P<choice>\d+):(?P<position>\d)",
):
    def __init__(self, choice_id: int, position: int) -> None:
        self.choice_id, self.position = choice_id, position
        super().__init__(
            discord.ui.Button(
                label=str(position),
                style=discord.ButtonStyle.success,
                custom_id=f"tw:choice:{choice_id}:{position}",
            )
        )

    @classmethod
    async def from_custom_id(
        cls, interaction: discord.Interaction[StoryBot], item: Any, match: re.Match[str]
    ) -> ChoiceButton:
        return cls(int(match["choice"]), int(match["position"]))

    async def callback(self, interaction: discord.Interaction[StoryBot]) -> None:
        await _cog(interaction).run_guarded(
            interaction, _cog(interaction).do_choose, self.choice_id, self.position
        )


def story_controls(story_id: int, position: int | None = None) -> discord.ui.View:
    """Continue and Retry, bound to one story: once it has ended, they say so instead of
    acting on the channel's next story. With the reply's `position`, ◀ ▶ to swipe
    through its alternatives (while it is the latest reply)."""
    view = discord.ui.View(timeout=None)
    view.add_item(ContinueButton(story_id))
    view.add_item(RetryButton(story_id))
    if position is not None:
        view.add_item(SwipeButton(story_id, position, "prev"))
        view.add_item(SwipeButton(story_id, position, "next"))
    return view


def choice_controls(choice_id: int, count: int) -> discord.ui.View:
    view = discord.ui.View(timeout=None)
    for position in range(1, count + 1):
        view.add_item(ChoiceButton(choice_id, position))
    return view


class ConfirmView(discord.ui.View):
    """Yes/no for one user; disables itself when answered or timed out."""

    def __init__(self, user_id: int, *, timeout: float = 60.0) -> None:
        super().__init__(timeout=timeout)
        self.user_id = user_id
        self.confirmed: bool | None = None
        self.interaction: discord.Interaction[StoryBot] | None = None

    async def interaction_check(self, interaction: discord.Interaction[StoryBot]) -> bool:
        if interaction.user.id != self.user_id:
            await interaction.response.send_message("This question is not for you.", ephemeral=True)
            return False
        return True

    async def _answer(self, interaction: discord.Interaction[StoryBot], confirmed: bool) -> None:
        self.confirmed, self.interaction = confirmed, interaction
        for item in self.children:
            item.disabled = True  # type: ignore[attr-defined]
        self.stop()

    @discord.ui.button(label="Yes, forget me", style=discord.ButtonStyle.danger)
    async def yes(
        self, interaction: discord.Interaction[StoryBot], button: discord.ui.Button[Any]
    ) -> None:
        await self._answer(interaction, True)

    @discord.ui.button(label="Cancel", style=discord.ButtonStyle.secondary)
    async def no(
        self, interaction: discord.Interaction[StoryBot], button: discord.ui.Button[Any]
    ) -> None:
        await self._answer(interaction, False)


class CardDraftView(discord.ui.View):
    """Keep / Again / Edit under a card the storyteller drafted, for whoever asked (it
    lives in memory: after a restart, ask again)."""

    def __init__(
        self,
        user_id: int,
        keep: Callable[[discord.Interaction[StoryBot], str], Awaitable[None]],
        again: Callable[[discord.Interaction[StoryBot]], Awaitable[None]],
        text: str,
        *,
        timeout: float = 900.0,
    ) -> None:
        super().__init__(timeout=timeout)
        self.user_id, self._keep, self._again, self.text = user_id, keep, again, text

    async def interaction_check(self, interaction: discord.Interaction[StoryBot]) -> bool:
        if interaction.user.id != self.user_id:
            await interaction.response.send_message(
                "Only whoever asked for this card can keep it.", ephemeral=True
            )
            return False
        return True

    @discord.ui.button(label="Keep", style=discord.ButtonStyle.success, emoji="📚")
    async def keep(
        self, interaction: discord.Interaction[StoryBot], button: discord.ui.Button[Any]
    ) -> None:
        await self._keep(interaction, self.text)

    @discord.ui.button(label="Again", style=discord.ButtonStyle.secondary, emoji="🔁")
    async def again(
        self, interaction: discord.Interaction[StoryBot], button: discord.ui.Button[Any]
    ) -> None:
        await self._again(interaction)

    @discord.ui.button(label="Edit", style=discord.ButtonStyle.secondary, emoji="✏️")
    async def edit(
        self, interaction: discord.Interaction[StoryBot], button: discord.ui.Button[Any]
    ) -> None:
        await interaction.response.send_modal(CardEditModal(self))


class CardEditModal(discord.ui.Modal, title="Edit the card"):
    text: discord.ui.TextInput[Any] = discord.ui.TextInput(
        label="What the card says", style=discord.TextStyle.paragraph, max_length=400
    )

    def __init__(self, view: CardDraftView) -> None:
        super().__init__()
        self.view = view
        self.text.default = view.text

    async def on_submit(self, interaction: discord.Interaction[StoryBot]) -> None:
        await self.view._keep(interaction, str(self.text.value))
