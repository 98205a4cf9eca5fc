"""Who may do what: every role against every story-changing command, in each mode.

The expected table is written out here, independently of `storyengine.story.permissions`, so
that a change to the rules shows up as a failing test. A refused command must change
nothing."""

from __future__ import annotations

import pytest

from storyengine.errors import NotAllowed, StoryError
from storyengine.records import Author

OWNER = Author("10", "Olive")  # starts the story
PLAYER = Author("11", "Pip")  # joins a round-robin game
OUTSIDER = Author("12", "Oz")
MODERATOR = Author("13", "Mo", moderator=True)
OPERATOR = None  # the CLI, the library, the bot's own clocks
ROLES = {
    "owner": OWNER,
    "player": PLAYER,
    "outsider": OUTSIDER,
    "moderator": MODERATOR,
    "operator": OPERATOR,
}
PREMISE = "Once upon a time, a fox found a key."


async def act(engine, channel: str, command: str, who: Author | None) -> None:
    if command == "continue":
        await engine.continue_story(channel, who, "A new line.")
    elif command == "offer":
        await engine.offer_choices(channel, who, "A new line.", count=2)
    elif command == "choose":
        offer = await engine.offer_choices(channel, OWNER, count=2)
        await engine.choose(channel, offer.id, 1, who)
    elif command == "retry":
        await engine.retry(channel, by=who)
    elif command == "undo":
        await engine.undo(channel, by=who)
    elif command == "pick":
        await engine.choose_alternative(channel, 1, by=who)
    elif command == "memory":
        await engine.set_memory(channel, "The fox is brave.", by=who)
    elif command == "note":
        await engine.set_authors_note(channel, "Spooky now.", by=who)
    elif command == "lore":
        await engine.add_lore(channel, "Owl", "owl", "A wise owl.", by=who)
    elif command == "unlore":
        await engine.remove_lore(channel, "Fox", by=who)
    elif command == "settings":
        await engine.configure_channel(channel, temperature=0.5, by=who)
    elif command == "timeout":
        await engine.set_turn_timeout(channel, 120, by=who)
    elif command == "end":
        await engine.end_story(channel, by=who)
    else:
        raise AssertionError(command)


EVERYONE = set(ROLES)
WITH_AUTHOR = ("continue", "offer", "choose")
REWRITES = "retry undo pick memory note lore unlore".split()
OWNERS = {"owner", "moderator", "operator"}
PLAYERS = {"owner", "player", "moderator", "operator"}
EXPECTED: dict[str, dict[str, set[str]]] = {
    "solo": {
        command: EVERYONE - ({"operator"} if command in WITH_AUTHOR else set())
        for command in (
            "continue offer choose retry undo pick memory note lore unlore settings timeout end"
        ).split()
    },
    "companion": {
        "continue": {"owner", "moderator"},
        "offer": {"owner", "moderator"},
        "choose": {"owner", "moderator"},
        **{
            c: OWNERS
            for c in "retry undo pick memory note lore unlore settings timeout end".split()
        },
    },
    "round-robin": {
        "continue": {"owner"},  # the starter holds the first turn; nobody else may write
        "offer": {"owner"},
        **{c: PLAYERS for c in REWRITES},
        "settings": OWNERS,
        "timeout": OWNERS,
        "end": OWNERS,
    },
}


async def snapshot(engine, channel: str) -> tuple:
    story = await engine.store.latest_story(channel)
    turns = await engine.store.db.execute_fetchall(
        "SELECT id, status FROM turns WHERE story_id = ? ORDER BY id", (story.id,)
    )
    return (
        story,
        [tuple(t) for t in turns],
        await engine.store.lore(story.id),
        await engine.store.channel_settings(channel),
        await engine.store.turn_timeout(channel),
    )


@pytest.mark.parametrize("mode", ["solo", "companion", "round-robin"])
async def test_permission_matrix(tiny_engine, mode):
    engine = tiny_engine
    wrong = []
    for command, allowed in EXPECTED[mode].items():
        for role, who in ROLES.items():
            if who is None and command in WITH_AUTHOR:
                continue  # a line, an offer and a choice always have an author
            channel = f"{mode}:{command}:{role}"
            await engine.start_story(channel, PREMISE, author=OWNER, mode=mode)
            if mode == "round-robin":
                await engine.join(channel, PLAYER)
            await engine.add_lore(channel, "Fox", "fox", "A clever fox.")
            before = await snapshot(engine, channel)
            try:
                await act(engine, channel, command, who)
                outcome = "allowed"
            except NotAllowed:
                outcome = "refused"
            except StoryError as exc:
                outcome = f"other error: {exc}"
            expected = "allowed" if role in allowed else "refused"
            if outcome != expected:
                wrong.append(f"{mode} {command} by {role}: {outcome}, expected {expected}")
            elif outcome == "refused" and await snapshot(engine, channel) != before:
                wrong.append(f"{mode} {command} by {role}: refused but changed the story")
    assert wrong == []


async def test_ownership_survives_forget_me_under_the_alias(tiny_engine):
    engine = tiny_engine
    await engine.start_story("c", PREMISE, author=OWNER, mode="companion")
    await engine.forget_user(OWNER.id)
    await engine.continue_story("c", OWNER, "Still my story.")  # the alias owns it
    with pytest.raises(NotAllowed):
        await engine.continue_story("c", OUTSIDER, "Not mine.")
    story = await engine.active_story("c")
    assert story.created_by.startswith("forgotten:")


async def test_a_story_whose_owner_is_unknown_is_for_moderators_only(tiny_engine):
    """A companion story whose owner was forgotten before aliases existed (created_by
    NULL) is no longer open to anyone, as it was."""
    engine = tiny_engine
    await engine.start_story("c", PREMISE, author=OWNER, mode="companion")
    await engine.store.db.execute("UPDATE stories SET created_by = NULL")
    with pytest.raises(NotAllowed):
        await engine.set_memory("c", "Hijacked.", by=OUTSIDER)
    await engine.set_memory("c", "Kept tidy.", by=MODERATOR)
