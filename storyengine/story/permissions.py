"""Who may do what to a story: the one table, enforced by the engine.

Front ends say who is acting (an `Author`, with `moderator=True` for someone who may
manage the channel: Discord's Manage Messages) and the engine decides. `None` as the
actor is the operator (the CLI, the library, the bot's own clocks): always allowed.

    action                     solo     companion          round-robin
    continue (a line, a reply)  anyone   owner, moderator   the player whose turn it is
    choose between offers       anyone   owner, moderator   players, starter, moderator
    retry, pick, undo, stop     anyone   owner, moderator   players, starter, moderator
    memory, note, lore          anyone   owner, moderator   players, starter, moderator
    settings, timeout, end      anyone   owner, moderator   starter, moderator
    join, leave                 –        –                  anyone (for themselves)
    pass                        –        –                  the current player, moderator
    read (recap, export, ...)   anyone   anyone             anyone

The owner of a companion story and the starter of a round-robin game is the story's
`created_by`. After `/story forget-me` it holds the person's anonymous alias, so they keep
their stories while their id and name are gone (see `StoryEngine.forget_user`); a story
whose owner was forgotten before aliases existed has no owner: moderators only.
"""

from __future__ import annotations

from enum import Enum

from ..errors import NotAllowed
from ..records import Author, Story, TurnState


class Action(Enum):
    CONTINUE = "continue the story"
    CHOOSE = "choose a continuation"
    REWRITE = "retry, undo or stop the storyteller"
    NOTES = "change the memory, the author's note or the lore"
    SETTINGS = "change this story's settings"
    END = "end the story"
    ILLUSTRATE = "draw a picture for the story"


_PLAYER_ACTIONS = {Action.REWRITE, Action.NOTES, Action.CHOOSE, Action.ILLUSTRATE}
_STARTER_ACTIONS = {Action.SETTINGS, Action.END}


def check(story: Story, actor: Author | None, action: Action, turn: TurnState | None) -> None:
    """Raise `NotAllowed` unless `actor` may do `action` to `story`. `turn` is the
    round-robin state (needed for round-robin stories)."""
    if actor is None or actor.moderator or story.mode == "solo":
        return
    owner = story.created_by is not None and story.created_by == actor.id
    if story.mode == "companion":
        if owner:
            return
        raise NotAllowed(
            f"This is a companion story for one person: only they (or a moderator) can "
            f"{action.value}."
        )
    # round-robin
    if owner:
        return
    if action in _STARTER_ACTIONS:
        raise NotAllowed(f"Only whoever started this game, or a moderator, can {action.value}.")
    players = {p.user_id for p in turn.active_players} if turn is not None else set()
    if action in _PLAYER_ACTIONS and actor.id in players:
        return
    if action is Action.CONTINUE:
        return  # the turn order decides (`StoryEngine._require_turn`)
    raise NotAllowed(f"Only this game's players can {action.value}: `/story join` first.")
