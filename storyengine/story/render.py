"""Rendering stories as text: the recap and the Markdown export."""

from __future__ import annotations

from ..records import LoreCard, Story, Turn
from ..safety import neutralize_mentions
from ..text import split_sentences

RECAP_SENTENCES = 8


def render_recap(story: Story, turns: list[Turn]) -> str:
    """A short "story so far": the premise and the first sentence of turns spread evenly
    over the story (extractive, like the prompt's summary)."""
    firsts = [s[0] for s in (split_sentences(t.text) for t in turns) if s]
    if len(firsts) > RECAP_SENTENCES:
        step = len(firsts) / RECAP_SENTENCES
        firsts = [firsts[int(i * step)] for i in range(RECAP_SENTENCES - 1)] + [firsts[-1]]
    lines = [f"Story so far ({len(turns)} turns): {story.premise}"]
    if firsts:
        lines.append(" ".join(firsts))
    return neutralize_mentions("\n".join(lines))


def render_markdown(story: Story, turns: list[Turn], lore: list[LoreCard]) -> str:
    title = story.premise.split("\n", 1)[0]
    if len(title) > 80:
        title = title[:77].rsplit(" ", 1)[0] + "…"
    meta = [f"- Mode: {story.mode}", f"- Started: {story.created_at}"]
    if story.genre:
        meta.insert(0, f"- Genre: {story.genre}")
    if story.ended_at:
        meta.append(f"- Ended: {story.ended_at}")
    authors = sorted({t.author_name for t in turns if t.kind == "user" and t.author_name})
    if authors:
        meta.append(f"- Written with: {', '.join(authors)} and the storyteller")
    parts = [f"# {title}", "\n".join(meta)]
    notes = []
    if story.memory:
        notes.append(f"**Memory:** {story.memory}")
    if story.authors_note:
        notes.append(f"**Author's note:** {story.authors_note}")
    notes.extend(f"**{c.name}** ({', '.join(c.triggers)}): {c.text}" for c in lore)
    if notes:
        parts.append("## Notes\n\n" + "\n\n".join(notes))
    body = [story.premise]
    for turn in turns:
        if turn.kind == "user":
            body.append(f"**{turn.author_name or 'Someone'}:** {turn.text}")
        else:
            body.append(turn.text)
    parts.append("## Story\n\n" + "\n\n".join(body))
    return neutralize_mentions("\n\n".join(parts) + "\n")
