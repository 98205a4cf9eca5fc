"""Context assembly: fitting a story into the model's window.

The prompt is built from parts, each with a token budget and a priority:

    1. header (genre), memory, premise     fixed: never cut
    2. lore cards                          only those triggered by recent text, own budget
    3. summary of older turns              extractive, own budget, oldest dropped first
    4. recent turns                        verbatim, newest kept first, fill what is left
       with the author's note placed a few turns before the end, where it steers most

Room for the reply (`reserve`) is taken off the window before anything else.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from ..errors import InvalidInput
from ..records import LoreCard
from ..text import split_sentences

TokenCounter = Callable[[str], int]


@dataclass(frozen=True)
class StoryMaterial:
    """Everything about a story that may go into a prompt."""

    premise: str
    turns: Sequence[str]
    genre: str | None = None
    memory: str = ""
    authors_note: str = ""
    lore: Sequence[LoreCard] = ()


@dataclass(frozen=True)
class ContextBudget:
    window: int = 1024
    reserve: int = 80
    """Tokens kept free for the reply."""
    lore_tokens: int = 160
    summary_tokens: int = 160
    min_recent_tokens: int = 64
    """The fixed parts may use at most window - reserve - this."""
    note_depth: int = 3
    """The author's note goes before the last `note_depth` turns."""
    lore_scan_turns: int = 4
    """How many recent turns are scanned for lore triggers."""


@dataclass(frozen=True)
class ContextSection:
    """One marked part of an assembled prompt, in prompt order (the context viewer)."""

    kind: str
    """genre, memory, lore, premise, summary, recent or note."""
    text: str
    tokens: int
    budget: int | None
    """The tokens its kind may use (None: fixed parts, never cut; recent turns share
    what the others leave)."""
    label: str = ""
    """What it is, for a person: a lore card's name, how many turns."""


@dataclass
class AssembledPrompt:
    text: str
    tokens: int
    turns_verbatim: int
    turns_summarised: int
    turns_dropped: int
    lore_used: list[str] = field(default_factory=list)
    sections: list[ContextSection] = field(default_factory=list)


@dataclass(frozen=True)
class ContextView:
    """What the model saw for a story's last reply, part by part (`/story context`)."""

    sections: list[ContextSection]
    tokens: int
    window: int
    reserve: int
    exact: bool
    """True when the parts rebuild the prompt the reply was written from exactly; False
    when the story's notes or lore changed since (`prompt` is then what it really saw)."""
    prompt: str

    def describe(self) -> str:
        """As text for a person: each part marked, with its tokens and its budget."""
        lines = [
            f"What the storyteller saw for its last reply: {self.tokens} of "
            f"{self.window - self.reserve} tokens ({self.window} in its window, "
            f"{self.reserve} kept for the reply)."
        ]
        if not self.exact:
            lines.append(
                "The notes or lore changed since that reply: this is the prompt as it was."
            )
            return "\n".join([*lines, "", self.prompt.strip()])
        names = {
            "genre": "Genre",
            "memory": "Memory",
            "lore": "Lore",
            "premise": "Premise",
            "summary": "Summary of older turns",
            "recent": "Recent turns",
            "note": "Author's note",
        }
        for section in self.sections:
            budget = "never cut" if section.budget is None else f"budget {section.budget}"
            label = f": {section.label}" if section.label else ""
            lines.append(f"\n[{names[section.kind]}{label}] {section.tokens} tokens, {budget}")
            lines.append(section.text)
        return "\n".join(lines)


class ContextBuilder:
    def __init__(self, count_tokens: TokenCounter, budget: ContextBudget) -> None:
        self.count = count_tokens
        self.budget = budget

    def fixed_parts(self, story: StoryMaterial) -> list[str]:
        parts = []
        if story.genre:
            parts.append(f"This is a {story.genre} story.")
        if story.memory:
            parts.append(story.memory)
        parts.append(story.premise)
        return [p for p in parts if p]

    def fixed_tokens(self, story: StoryMaterial) -> int:
        note = f"[Author's note: {story.authors_note}]" if story.authors_note else ""
        return sum(self.count(p) + 1 for p in [*self.fixed_parts(story), note] if p)

    def check_fits(self, story: StoryMaterial) -> None:
        """Raise `InvalidInput` if the fixed parts leave too little room for the story."""
        room = self.budget.window - self.budget.reserve - self.budget.min_recent_tokens
        used = self.fixed_tokens(story)
        if used > room:
            raise InvalidInput(
                f"The premise, memory and author's note together take {used} tokens; "
                f"they must fit in {room}. Shorten one of them."
            )

    def build(self, story: StoryMaterial) -> AssembledPrompt:
        self.check_fits(story)
        b = self.budget
        available = b.window - b.reserve - self.fixed_tokens(story)
        turns = list(story.turns)

        # Lore: cards whose triggers appear in the most recent turns, newest trigger first.
        recent_text = "\n".join(turns[-b.lore_scan_turns :] or [story.premise])
        lore_lines: list[str] = []
        lore_used: list[str] = []
        lore_left = min(b.lore_tokens, available - b.min_recent_tokens)
        for card in story.lore:
            if not card.triggered_by(recent_text):
                continue
            cost = self.count(card.render()) + 1
            if cost <= lore_left:
                lore_lines.append(card.render())
                lore_used.append(card.name)
                lore_left -= cost
        available -= sum(self.count(line) + 1 for line in lore_lines)

        # Recent turns verbatim, newest first, while they fit (less the summary's room).
        recent_room = available - min(b.summary_tokens, max(0, available // 4))
        verbatim: list[str] = []
        used = 0
        for turn in reversed(turns):
            cost = self.count(turn) + 1
            if used + cost > recent_room:
                break
            verbatim.insert(0, turn)
            used += cost
        if not verbatim and turns:
            # A single huge turn: keep its end, at sentence boundaries where possible.
            verbatim = [self._tail_that_fits(turns[-1], recent_room)]
            used = self.count(verbatim[0]) + 1
        older = turns[: len(turns) - len(verbatim)]

        # Older turns condensed: the first sentence of each, newest first, while the
        # summary budget allows; what does not fit (the oldest) is dropped.
        summary_room = min(b.summary_tokens, available - used)
        summary: list[str] = []
        summarised = 0
        for turn in reversed(older):
            sentences = split_sentences(turn)
            if not sentences:
                continue
            cost = self.count(sentences[0]) + 1
            if cost > summary_room:
                break
            summary.insert(0, sentences[0])
            summary_room -= cost
            summarised += 1

        prompt = self._render(story, lore_lines, summary, verbatim)
        tokens = self.count(prompt)
        # Token counts of parts can differ slightly from the count of the joined text;
        # shed the oldest verbatim turns until the whole is inside the window.
        while tokens > b.window - b.reserve and len(verbatim) > 1:
            verbatim.pop(0)
            prompt = self._render(story, lore_lines, summary, verbatim)
            tokens = self.count(prompt)
        return AssembledPrompt(
            text=prompt,
            tokens=tokens,
            turns_verbatim=len(verbatim),
            turns_summarised=summarised,
            turns_dropped=len(turns) - len(verbatim) - summarised,
            lore_used=lore_used,
            sections=self._sections(story, lore_lines, lore_used, summary, verbatim),
        )

    def _sections(
        self,
        story: StoryMaterial,
        lore: list[str],
        lore_names: list[str],
        summary: list[str],
        recent: list[str],
    ) -> list[ContextSection]:
        """The prompt's parts as `_render` lays them out, each with its token count."""
        b = self.budget
        recent_budget = b.window - b.reserve - self.fixed_tokens(story)

        def part(kind: str, text: str, budget: int | None, label: str = "") -> ContextSection:
            return ContextSection(kind, text, self.count(text) + 1, budget, label)

        out = []
        if story.genre:
            out.append(part("genre", f"This is a {story.genre} story.", None))
        if story.memory:
            out.append(part("memory", story.memory, None))
        out += [
            part("lore", line, b.lore_tokens, name)
            for line, name in zip(lore, lore_names, strict=True)
        ]
        out.append(part("premise", story.premise, None))
        if summary:
            out.append(
                part("summary", " ".join(summary), b.summary_tokens, f"{len(summary)} turns")
            )
        depth = min(b.note_depth, len(recent))
        before, after = recent[: len(recent) - depth], recent[len(recent) - depth :]
        if before:
            out.append(part("recent", "\n".join(before), recent_budget, f"{len(before)} turns"))
        if story.authors_note:
            out.append(part("note", f"[Author's note: {story.authors_note}]", None))
        if after:
            out.append(part("recent", "\n".join(after), recent_budget, f"{len(after)} turns"))
        return out

    def _render(
        self, story: StoryMaterial, lore: list[str], summary: list[str], recent: list[str]
    ) -> str:
        lines = [*self.fixed_parts(story)[:-1], *lore, self.fixed_parts(story)[-1]]
        if summary:
            lines.append(" ".join(summary))
        note = f"[Author's note: {story.authors_note}]" if story.authors_note else None
        depth = min(self.budget.note_depth, len(recent))
        lines.extend(recent[: len(recent) - depth])
        if note:
            lines.append(note)
        lines.extend(recent[len(recent) - depth :])
        # The model continues after a line break: a new paragraph of the story.
        return "\n".join(lines) + "\n"

    def _tail_that_fits(self, text: str, room: int) -> str:
        sentences = split_sentences(text)
        kept: list[str] = []
        for sentence in reversed(sentences):
            if self.count(" ".join([sentence, *kept])) + 1 > room:
                break
            kept.insert(0, sentence)
        if kept:
            return " ".join(kept)
        words = text.split()
        while words and self.count(" ".join(words)) + 1 > room:
            words = words[len(words) // 4 + 1 :]
        return " ".join(words)
