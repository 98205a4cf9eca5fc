"""Text of the bot's messages. No Discord calls here."""

from __future__ import annotations

from storyengine.records import ChoiceSet, TurnState
from storyengine.safety import neutralize_mentions

HELP = """\
**Taleweaver** writes stories with you. Start one with `/story start`, then:
• `/story continue [text]`: add your line (optional) and let me go on · `/story retry` · `/story undo`
• ◀ ▶ on my latest reply: page through its alternatives; the one you leave showing stays
• `/story memory`, `/story note` (author's note), `/story lore add` / `list` / `remove` / `export`: steer me
• `/story lore character` / `setting`: I draft a card, you keep it, draw again or edit it
• `/story import`: a character card (JSON or PNG), SillyTavern world info or a NovelAI lorebook
• `/story illustrate [turn]`: a picture for a turn (when the bot's host has turned pictures on)
• `/story recap` · `/story context` (what I saw, only you see it) · `/story export` (Markdown) · `/story save` / `load` (a story file) · `/story stop` · `/story end`
• `/story settings`: style (preset, temperature, length, turn timeout, best of) for this channel
• Round-robin games: `/story join` · `/story leave` · `/story pass` · `/story turn`
• Companion mode (`/story start mode:companion`): a private thread where you pick between my continuations
• `/story idea` for a premise · `/story help topic:privacy` · `/story my-data` · `/story forget-me`
React with 👍 or 👎 on my story messages: that is how I learn what this community enjoys."""

PRIVACY = """\
**What Taleweaver stores, and why**
• Stories: premises, notes and every line, with the author's Discord id and name, so the story can go on and be exported.
• Each text I write, with the prompt and settings that produced it, to learn from your feedback.
• Your reactions on my story messages and the continuations you choose, to learn what people enjoy.
• Nothing of `/story illustrate`: the turn and its lore go to the picture model (which the bot's host chose) to draw, and the picture lives only in the message.
Nothing else: I cannot read your messages (no message-content access).
Training on a server's stories and reactions happens only if its admins switch learning on (`/storyadmin learning on`); stories in DMs are never trained on.
`/story forget-me` deletes your reactions and choices, anonymises your lines in shared stories and keeps them out of any training, and stops recording your feedback."""


def quote_line(name: str, line: str, limit: int = 600) -> str:
    if len(line) > limit:
        line = line[: limit - 1] + "…"
    return f"**{name}:** {line}"


def story_message(text: str, *, user_line: tuple[str, str] | None = None, header: str = "") -> str:
    parts = [header] if header else []
    if user_line:
        parts.append(quote_line(*user_line))
    parts.append(text)
    return neutralize_mentions("\n\n".join(parts))


def choice_message(offer: ChoiceSet, author_name: str) -> str:
    parts = []
    if offer.user_turn:
        parts.append(quote_line(author_name, offer.user_turn.text, 300))
    parts.append("Choose how the story goes on:")
    parts.extend(f"**{o.position}.** {o.text}" for o in offer.options)
    return neutralize_mentions("\n\n".join(parts))


def describe_turn(state: TurnState) -> str:
    players = ", ".join(p.user_name for p in state.active_players) or "nobody yet"
    if state.current is None:
        return f"Players: {players}. Nobody has the turn: `/story join` to play."
    deadline = f" (passes <t:{int(state.deadline)}:R>)" if state.deadline else ""
    return neutralize_mentions(
        f"It is **{state.current.user_name}**'s turn{deadline}. Order: {players}."
    )
