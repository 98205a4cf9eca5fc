"""The story engine: the async API that every front end (CLI, bot, benchmarks) drives.

One active story per channel. Operations on one channel are serialised by a per-channel
lock; different channels proceed concurrently (their generations share the generator).
All state lives in SQLite, so a restarted engine resumes every open story as it was.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import (
    LIMITS,
    MAX_GENRE_CHARS,
    MAX_LORE_CARDS,
    MAX_LORE_NAME,
    MAX_NOTE_CHARS,
    MAX_TRIGGER_CHARS,
    MAX_TRIGGERS,
    Settings,
)
from ..errors import (
    GenerationCancelled,
    InvalidInput,
    NoActiveStory,
    NothingToRetry,
    NothingToUndo,
    NotYourTurn,
    StoryAlreadyRunning,
    StoryEnded,
)
from ..learning.admin import LearningAdmin
from ..learning.best_of import RewardSource, Scorer
from ..learning.registry import AdapterRegistry
from ..records import (
    MODES,
    Author,
    ChoiceOption,
    ChoiceSet,
    ForgetReport,
    ImportReport,
    LoreCard,
    Story,
    Swipe,
    Turn,
    TurnResult,
    TurnState,
)
from ..safety import SafetyFilter, clean_id, clean_name, normalize_text, quoted
from ..sampling import DEFAULT_PRESET, PRESETS, SamplingParams, preset
from ..serving.generation import BASE_ADAPTER, GenerationHandle, GenerationOutput, Generator
from ..storage.store import FORMER_PLAYER, ReactionEvent, Store, is_alias
from ..text import split_sentences
from .memory import ContextBudget, ContextBuilder, ContextView, StoryMaterial
from .narrator import Narration, Narrator, ProgressCallback
from .permissions import Action, check
from .reactions import ReactionRecorder
from .render import render_markdown, render_recap

if TYPE_CHECKING:
    from ..learning.scheduling import TrainingSchedule, TrainingScheduler

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_ID = 2**63 - 1
"""Largest id a database row can have (SQLite's INTEGER)."""
BRIDGE_TOKENS = 40
"""Round-robin: the storyteller's bridge between two players' lines is short."""
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


@dataclass(frozen=True)
class StoryView:
    story: Story
    turns: list[Turn]
    lore: list[LoreCard]


class StoryEngine:
    """Create with settings (and optionally a ready generator or store), then
    `await engine.start()`, or use `async with StoryEngine(settings) as engine:`.

    Every method that changes a story takes who acts (`author` or `by`): the engine
    checks it against `storyengine.story.permissions`. `by=None` is the operator (the CLI's
    single user, the library, the bot's own clocks), who may do anything. Every text a
    user hands in passes `SafetyFilter.clean_input`, every id `clean_id`, every display
    name `clean_name`; someone who asked to be forgotten acts under their alias."""

    def __init__(
        self,
        settings: Settings,
        *,
        generator: Generator | None = None,
        store: Store | None = None,
        adapter: str | None = None,
    ) -> None:
        """`adapter`: serve this registry version ("3" or "v3") or "base" (the bare base
        model) instead of following the registry's promotions (`chat --adapter`)."""
        self.settings = settings
        self._pinned = adapter.strip().lower() if adapter else None
        self.store = store or Store(settings.db_path)
        self._generator = generator
        self._narrator: Narrator | None = None
        self._locks: weakref.WeakValueDictionary[str, asyncio.Lock] = weakref.WeakValueDictionary()
        """Per-channel locks, each kept while an operation holds or awaits it: a bot that
        opens a thread per story sees new channels for as long as it runs."""
        self.registry = AdapterRegistry(self.store, settings.adapter_dir)
        self.reactions = ReactionRecorder(self.store)
        self.rewards: RewardSource | None = None
        """Where best-of-n gets its reward models (set by `start`)."""
        self.learning = LearningAdmin(
            self.store,
            self.registry,
            lambda: self.rewards,
            self.sync_adapter,
            self._stored_id,
        )
        """The learning loop as admins see it: switch, what is served, versions,
        statistics, rollback."""
        self._serving: str | None = None
        """The adapter being served (its registry name), None for the configured one."""
        self._adapter_lock = asyncio.Lock()
        self._in_flight: dict[str, set[GenerationHandle]] = {}
        self._closing = False
        self._closed = False
        self.clock: Callable[[], float] = time.time
        """Wall clock for turn deadlines (tests replace it)."""

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> StoryEngine:
        await self.store.open()
        if self._generator is None:
            from ..serving.generators import make_generator

            self._generator = await _in_daemon_thread(make_generator, self.settings)
        safety = SafetyFilter(
            max_input_chars=self.settings.max_input_chars,
            blocklist=self.settings.blocklist,
            special_tokens=self._generator.info.special_tokens,
        )
        self._narrator = Narrator(self._generator, safety)
        await self.registry.open()
        if self.rewards is None:
            self.rewards = RewardSource(
                self.settings, self.store, lambda: self.narrator.local_model
            )
        await self.sync_adapter()
        return self

    async def sync_adapter(self) -> str | None:
        """Serve the registry's promoted adapter (or, with none promoted, the configured
        one): a newly promoted version is loaded without a restart, generations in flight
        finish on the old one. Called before every generation; cheap when nothing changed."""
        if self._pinned is not None:
            return await self._serve_pinned()
        promoted = await self.registry.promoted()
        wanted = promoted.name if promoted else None
        if wanted != self._serving:
            assert self._generator is not None
            if promoted is not None:
                await self._generator.use_adapter(promoted.name, str(promoted.path))
            else:
                await self._generator.use_adapter(
                    "default" if self.settings.adapter else BASE_ADAPTER
                )
            log.info("now serving adapter %s", wanted or self.settings.adapter or "none")
            self._serving = wanted
        return wanted

    async def _serve_pinned(self) -> str | None:
        assert self._generator is not None and self._pinned is not None
        if self._serving == self._pinned:
            return None if self._pinned == "base" else self._pinned
        if self._pinned == "base":
            await self._generator.use_adapter(BASE_ADAPTER)
        else:
            number = self._pinned.removeprefix("v")
            version = await self.registry.get(int(number)) if number.isdigit() else None
            if version is None:
                raise InvalidInput(f"There is no adapter version {self._pinned!r} to serve.")
            await self._generator.use_adapter(version.name, str(version.path))
        self._serving = self._pinned
        return None if self._pinned == "base" else self._pinned

    @property
    def closing(self) -> bool:
        return self._closing

    def cancel_all(self) -> int:
        """Stop every generation in progress (they end as cancelled and are recorded as
        such); new ones are refused from now on. Returns how many were stopped."""
        self._closing = True
        stopped = 0
        for handles in list(self._in_flight.values()):
            for handle in list(handles):
                handle.cancel()
                stopped += 1
        return stopped

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Stop: generations in progress are cancelled and recorded as such (within
        `grace_s`), queued reactions are written, then the generator and the database
        are closed (the database checkpointed). Safe to call more than once."""
        if self._closed:
            return
        self.cancel_all()

        async def drain() -> None:  # every channel's operation ends (and is recorded)
            for lock in list(self._locks.values()):
                async with lock:
                    pass

        try:
            await asyncio.wait_for(drain(), grace_s)
        except TimeoutError:
            log.warning("closing with operations still running after %.0f s", grace_s)
        self._closed = True
        try:
            await asyncio.wait_for(self.reactions.close(), grace_s)
        except TimeoutError:
            log.warning("closing with reactions still queued after %.0f s", grace_s)
        try:
            if self._generator is not None:
                await self._generator.close()
        finally:
            await self.store.close()

    async def __aenter__(self) -> StoryEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def narrator(self) -> Narrator:
        if self._narrator is None:
            raise RuntimeError("StoryEngine.start() has not been called")
        return self._narrator

    @property
    def safety(self) -> SafetyFilter:
        return self.narrator.safety

    def _lock(self, channel: str) -> asyncio.Lock:
        return self._locks.setdefault(channel, asyncio.Lock())

    # -- who acts --------------------------------------------------------------------

    async def _who(self, author: Author) -> Author:
        """The author as stored: a clean id and name; someone who asked to be forgotten
        becomes their alias, with no name."""
        user_id = clean_id(author.id, "The user id")
        if is_alias(user_id):  # aliases are made here, never handed in
            raise InvalidInput("That user id is reserved.")
        alias = await self.store.forgotten_alias(user_id)
        if alias is not None:
            return Author(alias, FORMER_PLAYER, moderator=author.moderator)
        return Author(user_id, clean_name(author.name), moderator=author.moderator)

    async def _actor(self, by: Author | None) -> Author | None:
        return None if by is None else await self._who(by)

    async def _allow(self, story: Story, actor: Author | None, action: Action) -> None:
        """Raise `NotAllowed` unless `actor` may do `action` (see `permissions`)."""
        if actor is None or actor.moderator or story.mode == "solo":
            return
        turn = await self._turn_state(story) if story.mode == "round-robin" else None
        check(story, actor, action, turn)

    # -- queries ------------------------------------------------------------------

    async def active_story(self, channel: str, story_id: int | None = None) -> Story:
        """The channel's running story; with `story_id` (a button bound to a story), that
        story only: once it has ended, `StoryEnded` rather than acting on a newer one."""
        story = await self.store.active_story(clean_id(channel, "The channel"))
        if story_id is not None and (story is None or story.id != story_id):
            raise StoryEnded(channel, story_id)
        if story is None:
            raise NoActiveStory(channel)
        return story

    async def view(self, channel: str) -> StoryView:
        story = await self.active_story(channel)
        return StoryView(
            story, await self.store.active_turns(story.id), await self.store.lore(story.id)
        )

    async def open_stories(self) -> list[Story]:
        return await self.store.active_stories()

    def is_generating(self, channel: str) -> bool:
        return channel in self._in_flight

    def queue_position(self, channel: str) -> int | None:
        """How many requests are ahead of this channel's generation (0 once it is
        being written), or None when the channel is not generating."""
        handles = self._in_flight.get(channel)
        return min(h.queue_position for h in handles) if handles else None

    # -- sampling settings --------------------------------------------------------

    async def sampling_for(self, channel: str, **overrides: Any) -> SamplingParams:
        """The channel's parameters: its preset (or the configured default) with the
        channel's overrides, then this call's overrides."""
        preset_name, saved = await self.store.channel_settings(clean_id(channel, "The channel"))
        params = preset(preset_name).params if preset_name else self.settings.sampling
        params = params.replace(best_of=self.settings.best_of)  # unless the channel says
        try:
            params = params.replace(**saved)
        except (InvalidInput, TypeError):  # saved by an older release with other bounds
            log.warning("ignoring channel %s's saved settings %r", channel, saved)
        try:
            return params.replace(**overrides)
        except TypeError:
            raise InvalidInput(f"Unknown setting among {sorted(overrides)}.") from None

    async def configure_channel(
        self,
        channel: str,
        *,
        preset_name: str | None = None,
        temperature: float | None = None,
        max_new_tokens: int | None = None,
        by: Author | None = None,
        **more: Any,
    ) -> SamplingParams:
        """Set the channel's preset and/or parameter overrides. Choosing a preset clears
        earlier overrides. Returns the resulting parameters. While a story runs here,
        only those its rules allow may change them."""
        channel = clean_id(channel, "The channel")
        actor = await self._actor(by)
        async with self._lock(channel):
            story = await self.store.active_story(channel)
            if story is not None:
                await self._allow(story, actor, Action.SETTINGS)
            current_preset, saved = await self.store.channel_settings(channel)
            if preset_name is not None:
                preset(preset_name)  # validates
                current_preset, saved = preset_name.strip().lower(), {}
            changes = {"temperature": temperature, "max_new_tokens": max_new_tokens, **more}
            saved = {**saved, **{k: v for k, v in changes.items() if v is not None}}
            base = preset(current_preset).params if current_preset else self.settings.sampling
            try:
                params = base.replace(**saved)  # validates the combination
            except TypeError:
                raise InvalidInput(f"Unknown setting among {sorted(changes)}.") from None
            await self.store.set_channel_settings(channel, current_preset, saved)
            return params

    # -- story operations ---------------------------------------------------------

    async def start_story(
        self,
        channel: str,
        premise: str,
        *,
        author: Author,
        genre: str | None = None,
        mode: str = "solo",
        community: str | None = None,
        on_progress: ProgressCallback | None = None,
    ) -> TurnResult:
        """Open a story in `channel` and write its opening. `community` is where the
        story is told (a server's id, or DIRECT_MESSAGES); its learning switch decides
        whether the story is trained on. None: the operator's own story (CLI, library),
        always trainable."""
        if mode not in MODES:
            raise InvalidInput(
                f"Unknown mode {quoted(str(mode))}. Choose one of: {', '.join(MODES)}."
            )
        channel = clean_id(channel, "The channel")
        community = clean_id(community, "The community") if community is not None else None
        premise = self.safety.clean_input(premise, what="The premise")
        genre = (
            self.safety.clean_input(genre, what="The genre", required=False, limit=MAX_GENRE_CHARS)
            or None
        )
        author = await self._who(author)
        async with self._lock(channel):
            if await self.store.active_story(channel) is not None:
                raise StoryAlreadyRunning(channel)
            self._builder(SamplingParams()).check_fits(StoryMaterial(premise, (), genre))
            story = await self.store.create_story(
                channel,
                premise,
                genre=genre,
                mode=mode,
                created_by=author.id,
                community=community,
            )
            log.info("story %d started in %s", story.id, channel)
            if mode == "round-robin":
                await self.store.add_player(story.id, author.id, author.name)
                await self._advance_turn(story, after_seat=None)
            action = await self.store.next_action(story.id)
            return await self._write_bot_turn(story, [], action, None, on_progress)

    async def continue_story(
        self,
        channel: str,
        author: Author,
        text: str | None = None,
        *,
        on_progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> TurnResult:
        """Add the author's line (optional) and let the storyteller continue."""
        line = self.safety.clean_input(text, what="Your line", required=False)
        author = await self._who(author)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, author, Action.CONTINUE)
            seat = await self._require_turn(story, author) if story.mode == "round-robin" else None
            if seat is not None:
                # Between players' lines the storyteller writes a short bridge.
                overrides.setdefault("max_new_tokens", BRIDGE_TOKENS)
            params = await self.sampling_for(story.channel, **overrides)  # validates first
            await self.store.expire_open_choices(story.id)
            turns, user_turn, action = await self._add_user_line(story, author, line)
            result = await self._write_bot_turn(
                story, turns, action, user_turn, on_progress, params
            )
            if seat is not None:
                await self._advance_turn(story, after_seat=seat)
            return result

    async def _add_user_line(
        self, story: Story, author: Author, line: str
    ) -> tuple[list[Turn], Turn | None, int]:
        turns = await self.store.active_turns(story.id)
        action = await self.store.next_action(story.id)
        user_turn = None
        if line:
            user_turn = await self.store.add_turn(
                story.id,
                action=action,
                kind="user",
                text=line,
                author_id=author.id,
                author_name=author.name,
                train_excluded=is_alias(author.id),
            )
            turns.append(user_turn)
        return turns, user_turn, action

    async def retry(
        self,
        channel: str,
        *,
        by: Author | None = None,
        on_progress: ProgressCallback | None = None,
        **overrides: Any,
    ) -> TurnResult:
        """Write the last bot turn again. The old text is kept as an alternative."""
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, actor, Action.REWRITE)
            turns = await self.store.active_turns(story.id)
            if not turns or turns[-1].kind != "bot":
                raise NothingToRetry(
                    "The last turn is not the storyteller's; there is nothing to retry."
                )
            params = await self.sampling_for(story.channel, **overrides)
            last = turns.pop()
            user_turn = turns[-1] if turns and turns[-1].action == last.action else None
            following = await self.store.next_best_candidate(last)
            if following is not None:  # best-of-n wrote it already: show the next best
                await self.store.swap_active(last.id, following.id)
                turn = await self.store.turn(following.id)
                assert turn is not None and turn.generation_id is not None
                return TurnResult(story, turn, user_turn, turn.generation_id, 0.0)
            return await self._write_bot_turn(
                story, turns, last.action, user_turn, on_progress, params, replacing=last
            )

    async def alternatives(self, channel: str) -> list[Turn]:
        """The retry stack of the last bot turn, oldest first (the active one included)."""
        story = await self.active_story(channel)
        turns = await self.store.active_turns(story.id)
        if not turns or turns[-1].kind != "bot":
            return []
        return await self.store.alternatives(story.id, turns[-1].position)

    async def choose_alternative(
        self, channel: str, number: int, *, by: Author | None = None
    ) -> Turn:
        """Make alternative `number` (1-based, as listed by `alternatives`) the active one.
        The choice is a preference, as a companion choice is: the chosen one over the
        others (replacing what the same person chose here before)."""
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, actor, Action.REWRITE)
            options = await self.alternatives(channel)
            if not options:
                raise NothingToRetry("There are no alternatives to choose from.")
            if not isinstance(number, int) or not 1 <= number <= len(options):
                raise InvalidInput(f"Choose an alternative from 1 to {len(options)}.")
            chosen = options[number - 1]
            await self._keep(options, chosen, actor, over=[t.generation_id for t in options])
            turn = await self.store.turn(chosen.id)
            assert turn is not None
            return turn

    async def swipe(
        self, channel: str, story_id: int, position: int, step: int, *, by: Author | None = None
    ) -> Swipe:
        """Show the storyteller's latest reply's previous (`step` -1) or next (+1)
        alternative in its place (SillyTavern's swipes). The one kept is preferred over
        those paged past: each swipe replaces the person's pairs among these alternatives
        with "the one shown now over every one they have seen"."""
        if step not in (-1, 1):
            raise InvalidInput("A swipe goes one step back or forward.")
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel, story_id)
            await self._allow(story, actor, Action.REWRITE)
            turns = await self.store.active_turns(story.id)
            if not turns or turns[-1].kind != "bot" or turns[-1].position != position:
                raise InvalidInput(
                    "Only the storyteller's latest reply can be swiped; this one is part "
                    "of the story now."
                )
            options = await self.store.alternatives(story.id, position)
            shown = next(i for i, t in enumerate(options) if t.status == "active")
            wanted = shown + step
            if not 0 <= wanted < len(options):
                raise NothingToRetry(
                    "This is the first one."
                    if step < 0
                    else "This is the newest one: Retry writes another."
                )
            chosen = options[wanted]
            seen = {options[shown].generation_id}
            if actor is not None:
                group = [t.generation_id for t in options if t.generation_id is not None]
                seen |= await self.store.choices_among(group, actor.id)
            await self._keep(options, chosen, actor, over=list(seen))
            turn = await self.store.turn(chosen.id)
            assert turn is not None
            before = turns[-2] if len(turns) > 1 and turns[-2].kind == "user" else None
            return Swipe(turn, wanted + 1, len(options), before)

    async def _keep(
        self, options: list[Turn], chosen: Turn, actor: Author | None, over: list[int | None]
    ) -> None:
        """Make `chosen` (one of `options`, a turn's alternatives) the active one; with a
        person choosing, record it as preferred over the generations `over`."""
        current = next(t for t in options if t.status == "active")
        if chosen.id != current.id:
            await self.store.swap_active(current.id, chosen.id)
        if actor is None or is_alias(actor.id) or chosen.generation_id is None:
            return
        rejected = [g for g in over if g is not None and g != chosen.generation_id]
        if rejected:
            group = [t.generation_id for t in options if t.generation_id is not None]
            await self.store.replace_choice(group, chosen.generation_id, rejected, actor.id)

    async def undo(self, channel: str, *, by: Author | None = None) -> list[Turn]:
        """Remove the most recent action (a user's line and the reply to it, or a bot
        turn on its own). The turns stay in the database, marked undone."""
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, actor, Action.REWRITE)
            turns = await self.store.active_turns(story.id)
            if not turns:
                raise NothingToUndo("There is nothing to undo yet.")
            last_action = max(t.action for t in turns)
            removed = [t for t in turns if t.action == last_action]
            await self.store.undo_action(story.id, last_action)
            return removed

    async def set_memory(self, channel: str, text: str, *, by: Author | None = None) -> Story:
        return await self._set_note(channel, "memory", text, "The memory", by)

    async def set_authors_note(self, channel: str, text: str, *, by: Author | None = None) -> Story:
        return await self._set_note(channel, "authors_note", text, "The author's note", by)

    async def _set_note(
        self, channel: str, field: str, text: str, what: str, by: Author | None
    ) -> Story:
        limit = MAX_NOTE_CHARS if field == "authors_note" else None
        cleaned = self.safety.clean_input(text, what=what, required=False, limit=limit)
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, actor, Action.NOTES)
            material = self._material(story, [], [])
            material = dataclasses.replace(material, **{field: cleaned})
            self._builder(await self.sampling_for(channel)).check_fits(material)
            await self.store.update_story(story.id, **{field: cleaned})
            return await self.active_story(channel)

    async def add_lore(
        self,
        channel: str,
        name: str,
        triggers: list[str] | str,
        text: str,
        *,
        by: Author | None = None,
    ) -> LoreCard:
        """Add or replace a lore card. `triggers` may be a comma-separated string."""
        card = self._lore_card(name, triggers, text)
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, actor, Action.NOTES)
            existing = await self.store.lore(story.id)
            if len(existing) >= MAX_LORE_CARDS and card.name.lower() not in {
                c.name.lower() for c in existing
            }:
                raise InvalidInput(f"A story may have at most {MAX_LORE_CARDS} lore cards.")
            await self.store.upsert_lore(story.id, card)
        return card

    def _lore_card(
        self, name: str, triggers: list[str] | tuple[str, ...] | str, text: str
    ) -> LoreCard:
        """A lore card made of what someone typed or imported: checked and cleaned."""
        name = " ".join(
            self.safety.clean_input(name, what="The card's name", limit=MAX_LORE_NAME).split()
        )
        if isinstance(triggers, str):
            triggers = triggers.split(",")
        if len(triggers) > 100:
            raise InvalidInput(f"Give at most {MAX_TRIGGERS} trigger words.")
        words = tuple(
            dict.fromkeys(
                " ".join(
                    self.safety.clean_input(
                        t, what="A trigger word", required=False, limit=MAX_TRIGGER_CHARS
                    ).split()
                )
                for t in triggers
            )
        )
        words = tuple(w for w in words if w) or (name,)
        if len(words) > MAX_TRIGGERS:
            raise InvalidInput(
                f"Give at most {MAX_TRIGGERS} trigger words, each at most "
                f"{MAX_TRIGGER_CHARS} characters."
            )
        body = self.safety.clean_input(text, what="The card's text", limit=MAX_NOTE_CHARS)
        return LoreCard(name, words, body)

    async def import_lore(
        self, channel: str, raw: bytes, *, by: Author | None = None
    ) -> ImportReport:
        """A SillyTavern character card (JSON or PNG) or world info, or a NovelAI
        lorebook, into the story: its entries become lore cards (replacing cards of the
        same name), and a character card's personality and scenario become the memory
        when the story has none. Everything is checked first; it lands whole or not."""
        from .lorebooks import fill_names, read

        found = read(raw)
        user = by.name if by is not None and by.name else "you"

        def filled(text: str) -> str:
            return fill_names(text, found.character, user)

        cards = [self._lore_card(c.name, c.triggers, filled(c.text)) for c in found.cards]
        memory = self.safety.clean_input(
            filled(found.memory), what="The card's memory", required=False
        )
        if found.greeting and await self.find_story(channel) is None:
            return await self._start_from_card(channel, found, cards, memory, filled, by)
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, actor, Action.NOTES)
            names = {c.name.lower() for c in await self.store.lore(story.id)}
            names |= {c.name.lower() for c in cards}
            if len(names) > MAX_LORE_CARDS:
                raise InvalidInput(
                    f"With this file the story would have {len(names)} lore cards; a story "
                    f"may have at most {MAX_LORE_CARDS}."
                )
            set_memory = bool(memory) and not story.memory
            if set_memory:
                material = self._material(story, [], [])
                self._builder(await self.sampling_for(channel)).check_fits(
                    dataclasses.replace(material, memory=memory)
                )
            await self.store.import_lore(story.id, cards, memory if set_memory else None)
        return ImportReport(
            found.kind,
            [c.name for c in cards],
            set_memory,
            bool(memory) and not set_memory,
            found.shortened,
            found.skipped,
        )

    async def _start_from_card(
        self,
        channel: str,
        found: Any,
        cards: list[LoreCard],
        memory: str,
        filled: Callable[[str], str],
        by: Author | None,
    ) -> ImportReport:
        """No story here yet: a character card starts one, its scenario the premise
        (else a line naming the character), its greeting (`first_mes`) the opening."""
        from ..saves import SavedLore, SavedStory, SavedTurn

        premise = filled(found.scenario) or f"A story with {found.character}."
        premise = self.safety.clean_input(premise, what="The card's scenario")
        saved = SavedStory(
            premise,
            memory=memory,
            lore=tuple(SavedLore(c.name, c.triggers, c.text) for c in cards),
            turns=(SavedTurn("bot", filled(found.greeting)),),
        )
        await self.load_story(channel, saved.to_json(), author=by or Author("operator", "You"))
        return ImportReport(
            found.kind,
            [c.name for c in cards],
            bool(memory),
            False,
            found.shortened,
            found.skipped,
            started=True,
        )

    async def lore_as_world_info(self, channel: str) -> str:
        """The story's lore as SillyTavern world info JSON."""
        from .lorebooks import world_info

        return world_info(await self.lore(channel))

    async def remove_lore(self, channel: str, name: str, *, by: Author | None = None) -> None:
        name = " ".join(
            self.safety.clean_input(name, what="The card's name", limit=MAX_LORE_NAME).split()
        )
        actor = await self._actor(by)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, actor, Action.NOTES)
            if not await self.store.remove_lore(story.id, name):
                raise InvalidInput(f"There is no lore card named {quoted(name)}.")

    async def lore(self, channel: str) -> list[LoreCard]:
        story = await self.active_story(channel)
        return await self.store.lore(story.id)

    async def recap(self, channel: str) -> str:
        view = await self.view(channel)
        return render_recap(view.story, view.turns)

    async def export_markdown(self, channel: str) -> str:
        """The active story (or, if none, the channel's last one) as Markdown."""
        channel = clean_id(channel, "The channel")
        story = await self.store.active_story(channel) or await self.store.latest_story(channel)
        if story is None:
            raise NoActiveStory(channel)
        return render_markdown(
            story, await self.store.active_turns(story.id), await self.store.lore(story.id)
        )

    async def save_story(self, channel: str) -> str:
        """The active story (or, if none, the channel's last one) as a story file (JSON,
        `saves`): premise, style, notes, lore, and the turns with their alternatives."""
        from ..saves import SavedLore, SavedStory, SavedTurn

        channel = clean_id(channel, "The channel")
        story = await self.store.active_story(channel) or await self.store.latest_story(channel)
        if story is None:
            raise NoActiveStory(channel)
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
        preset_name, sampling = await self.store.channel_settings(channel)
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
        from ..saves import SavedLore, SavedStory, SavedTurn, parse

        saved = parse(raw, max_text=self.settings.max_input_chars)
        clean = self.safety.clean_input

        def text(value: str, what: str, limit: int, *, required: bool = True) -> str:
            return clean(value, what=what, required=required, limit=limit)

        def story_text(value: str, what: str) -> str:
            """A turn: as long as the file allows (a reply may be longer than what a
            person may type at once), cleaned as any text is."""
            cleaned = self.safety.strip_control_tokens(normalize_text(value).strip())
            if not cleaned:
                raise InvalidInput(f"{what} is empty.")
            return cleaned

        try:
            params = preset(saved.preset).params if saved.preset else self.settings.sampling
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
        self._builder(params).check_fits(
            StoryMaterial(saved.premise, (), saved.genre, saved.memory, saved.authors_note)
        )
        loader = await self._who(author)
        channel = clean_id(channel, "The channel")
        async with self._lock(channel):
            if await self.store.active_story(channel) is not None:
                raise StoryAlreadyRunning(channel)
            story = await self.store.import_story(
                channel, saved, loaded_by=loader.id, community=community
            )
            if story.mode == "round-robin":
                await self.store.add_player(story.id, loader.id, loader.name)
                await self._advance_turn(story, after_seat=None)
            log.info("story %d loaded in %s (%d turns)", story.id, channel, len(saved.turns))
        return await self.view(channel)

    async def end_story(self, channel: str, *, by: Author | None = None) -> Story:
        """End the channel's story (stopping any generation in progress first)."""
        actor = await self._actor(by)
        story = await self.active_story(channel)
        await self._allow(story, actor, Action.END)
        self._cancel(story.channel)
        async with self._lock(story.channel):
            story = await self.active_story(channel)
            await self.store.end_story(story.id)
            ended = await self.store.story(story.id)
            assert ended is not None
            return ended

    def stop(self, channel: str) -> bool:
        """Cancel the channel's generation in progress (the operator: no permission
        check; usable from a signal handler). True if there was one."""
        return self._cancel(channel)

    async def request_stop(self, channel: str, *, by: Author | None) -> bool:
        """`stop`, for someone whose permission is checked first (`Action.REWRITE`)."""
        channel = clean_id(channel, "The channel")
        if not self._in_flight.get(channel):
            return False
        story = await self.store.active_story(channel)
        if story is not None:
            await self._allow(story, await self._actor(by), Action.REWRITE)
        return self._cancel(channel)

    def _cancel(self, channel: str) -> bool:
        handles = self._in_flight.get(channel)
        if not handles:
            return False
        for handle in list(handles):
            handle.cancel()
        return True

    async def context(self, channel: str) -> ContextView:
        """What the model saw for the story's last reply, each part marked with its
        tokens against its budget (NovelAI's context viewer)."""
        story = await self.active_story(channel)
        turns = await self.store.active_turns(story.id)
        last = next((t for t in reversed(turns) if t.kind == "bot"), None)
        record = await self.store.generation(last.generation_id) if last else None
        if last is None or record is None:
            raise InvalidInput("The storyteller has not written anything in this story yet.")
        params = await self.sampling_for(channel)
        written = record.get("params") or {}
        if written.get("max_new_tokens"):  # the reply's own length set the room left
            params = params.replace(max_new_tokens=int(written["max_new_tokens"]))
        before = turns[: turns.index(last)]
        material = self._material(story, before, await self.store.lore(story.id))
        built = self._builder(params).build(material)
        window = self.narrator.info.context_window
        stored = str(record["prompt"])
        return ContextView(
            built.sections,
            built.tokens,
            window,
            params.max_new_tokens,
            stored == built.text,
            stored,
        )

    def opening_prompt(self, premise: str, params: SamplingParams | None = None) -> str:
        """The prompt a new story with `premise` opens with (what `start_story` hands
        the model): for benchmarks and tools that sample openings themselves."""
        params = params or self.settings.sampling
        return self._builder(params).build(StoryMaterial(premise, ())).text

    async def suggest_premise(self, genre: str | None = None) -> str:
        """A premise to start from: the storyteller's own first sentence of a new tale."""
        genre = self.safety.clean_input(
            genre, what="The genre", required=False, limit=MAX_GENRE_CHARS
        )
        opening = f"Once upon a time, in a {genre} land," if genre else "Once upon a time,"
        params = self.settings.sampling.replace(max_new_tokens=40, num_beams=1, temperature=0.9)
        narration = await self.narrator.narrate(opening, params, channel="ideas")
        first = split_sentences(narration.text)[:1]
        return self.safety.clean_output(f"{opening} {first[0] if first else narration.text}")

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
        name = " ".join(
            self.safety.clean_input(
                name, what="The name", required=False, limit=MAX_LORE_NAME
            ).split()
        )
        hint = self.safety.clean_input(hint, what="The hint", required=False, limit=100)
        story = await self.active_story(channel)
        if not name:
            taken = {c.name.lower() for c in await self.store.lore(story.id)}
            choices = [n for n in CARD_NAMES[kind] if n.lower() not in taken] or CARD_NAMES[kind]
            name = choices[len(taken) % len(choices)]
        subject = name if kind == "character" else f"The {name.lower().removeprefix('the ')}"
        context = story.premise + (f" {hint.rstrip('.')}." if hint else "")
        params = (await self.sampling_for(channel)).replace(
            max_new_tokens=28, num_beams=1, temperature=0.9, best_of=1, seed=None
        )
        sentences: list[str] = []
        for lead in CARD_LEADS[kind]:
            lead = lead.format(subject=subject)
            prompt = "\n".join([context, " ".join(sentences), lead]).replace("\n\n", "\n")
            narration = await self.narrator.narrate(prompt, params, channel=f"{channel}:cards")
            first = split_sentences(narration.text)[:1]
            if first:
                sentences.append(f"{lead} {first[0]}")
        text = self.safety.clean_output(" ".join(sentences)) or f"{subject}."
        while len(text) > MAX_NOTE_CHARS and len(sentences) > 1:
            sentences.pop()
            text = self.safety.clean_output(" ".join(sentences))
        return self._lore_card(name, [name], text[:MAX_NOTE_CHARS])

    # -- round-robin --------------------------------------------------------------

    async def turn_state(self, channel: str) -> TurnState:
        story = await self.active_story(channel)
        return await self._turn_state(story)

    async def join(self, channel: str, author: Author) -> TurnState:
        """Take a seat in a round-robin story (at the end of the order)."""
        author = await self._who(author)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self._round_robin_story(channel)
            state = await self._turn_state(story)
            if any(p.user_id == author.id for p in state.active_players):
                raise InvalidInput("You are already in this game.")
            await self.store.add_player(story.id, author.id, author.name)
            if state.current is None:
                await self._advance_turn(story, after_seat=None)
            return await self._turn_state(story)

    async def leave(self, channel: str, author: Author) -> TurnState:
        author = await self._who(author)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self._round_robin_story(channel)
            state = await self._turn_state(story)
            seat = next((p.seat for p in state.active_players if p.user_id == author.id), None)
            if seat is None:
                raise InvalidInput("You are not in this game.")
            await self.store.set_player_active(story.id, author.id, False)
            if state.current is not None and state.current.seat == seat:
                await self._advance_turn(story, after_seat=seat)
            return await self._turn_state(story)

    async def pass_turn(
        self, channel: str, author: Author, *, moderator: bool = False
    ) -> TurnState:
        """The current player passes (or a moderator skips them)."""
        author = await self._who(author)
        moderator = moderator or author.moderator
        async with self._lock(clean_id(channel, "The channel")):
            story = await self._round_robin_story(channel)
            state = await self._turn_state(story)
            if state.current is None:
                raise InvalidInput("Nobody has the turn: join the game first.")
            if state.current.user_id != author.id and not moderator:
                raise NotYourTurn(
                    f"It is {state.current.user_name}'s turn; only they or a moderator can pass it."
                )
            await self._advance_turn(story, after_seat=state.current.seat)
            return await self._turn_state(story)

    async def set_turn_timeout(
        self, channel: str, seconds: int, *, by: Author | None = None
    ) -> None:
        low, high = LIMITS["turn_timeout_s"][1:]
        if not isinstance(seconds, int) or not low <= seconds <= (high or low):
            raise InvalidInput("The turn timeout must be between 30 seconds and 7 days.")
        channel = clean_id(channel, "The channel")
        actor = await self._actor(by)
        async with self._lock(channel):
            story = await self.store.active_story(channel)
            if story is not None:
                await self._allow(story, actor, Action.SETTINGS)
            await self.store.set_turn_timeout(channel, seconds)

    async def expire_turns(self) -> list[tuple[str, TurnState]]:
        """Pass every round-robin turn whose deadline has gone by. Returns the channels
        whose turn moved on, with their new state (the bot announces them). Deadlines are
        stored, so turns missed while the process was down pass on the first call."""
        moved = []
        for channel in await self.store.overdue_turns(self.clock()):
            async with self._lock(channel):
                story = await self.store.active_story(channel)
                if story is None:
                    continue
                state = await self._turn_state(story)
                if state.deadline is None or state.deadline > self.clock():
                    continue  # someone took the turn meanwhile
                await self._advance_turn(
                    story, after_seat=state.current.seat if state.current else None
                )
                moved.append((channel, await self._turn_state(story)))
        return moved

    async def check_turn(self, channel: str, author: Author) -> None:
        """Raise `NotYourTurn`, `NotAllowed` (or `NoActiveStory`) unless `author` may add
        a line now: lets a front end refuse politely before it starts any work."""
        story = await self.active_story(channel)
        author = await self._who(author)
        await self._allow(story, author, Action.CONTINUE)
        if story.mode == "round-robin":
            await self._require_turn(story, author)

    async def check_allowed(self, channel: str, by: Author, action: Action) -> None:
        """Raise `NotAllowed` (or `NoActiveStory`) unless `by` may do `action` to the
        channel's story: for a front end that wants to refuse before it starts work."""
        story = await self.active_story(channel)
        await self._allow(story, await self._who(by), action)

    async def _round_robin_story(self, channel: str) -> Story:
        story = await self.active_story(channel)
        if story.mode != "round-robin":
            raise InvalidInput("This story is not a round-robin game.")
        return story

    async def _turn_state(self, story: Story) -> TurnState:
        players = tuple(await self.store.players(story.id))
        seat, deadline = await self.store.turn_pointer(story.id)
        current = next((p for p in players if p.seat == seat and p.active), None)
        return TurnState(story.id, players, current, deadline if current else None)

    async def _require_turn(self, story: Story, author: Author) -> int:
        state = await self._turn_state(story)
        if state.current is None:
            raise NotYourTurn("Nobody has the turn yet: join the game first.")
        if state.current.user_id != author.id:
            if not any(p.user_id == author.id for p in state.active_players):
                raise NotYourTurn("Join the game first to add a line.")
            raise NotYourTurn(f"It is {state.current.user_name}'s turn. Yours will come!")
        return state.current.seat

    async def _advance_turn(self, story: Story, *, after_seat: int | None) -> None:
        """Give the turn to the next active player after `after_seat` (wrapping round),
        with a fresh deadline; nobody if no one is left."""
        active = [p for p in await self.store.players(story.id) if p.active]
        if not active:
            await self.store.set_turn(story.id, None, None)
            return
        later = [p for p in active if after_seat is None or p.seat > after_seat]
        nxt = (later or active)[0]
        timeout = await self.store.turn_timeout(story.channel) or self.settings.turn_timeout_s
        await self.store.set_turn(story.id, nxt.seat, self.clock() + timeout)

    # -- choices (companion mode) --------------------------------------------------

    async def offer_choices(
        self,
        channel: str,
        author: Author,
        text: str | None = None,
        *,
        count: int = 3,
        **overrides: Any,
    ) -> ChoiceSet:
        """Add the author's line and write `count` alternative continuations at once
        (they are batched together); none joins the story until one is chosen."""
        if not isinstance(count, int) or not 2 <= count <= 4:
            raise InvalidInput("Offer between 2 and 4 alternatives.")
        line = self.safety.clean_input(text, what="Your line", required=False)
        author = await self._who(author)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, author, Action.CONTINUE)
            if story.mode == "round-robin":
                await self._require_turn(story, author)
            params = await self.sampling_for(story.channel, **overrides)
            await self.store.expire_open_choices(story.id)
            turns, user_turn, action = await self._add_user_line(story, author, line)
            if params.beam_search or params.greedy:  # alternatives need sampling
                params = PRESETS[DEFAULT_PRESET].params.replace(
                    max_new_tokens=params.max_new_tokens
                )
            base_seed = params.seed if params.seed is not None else int(self.clock() * 1000) % 2**31
            prompt = await self._prompt(story, turns, params)
            results = await asyncio.gather(
                *(
                    self._narrate(
                        story,
                        prompt,
                        params.replace(seed=(base_seed + 7919 * i) % 2**63),
                        echo_of=user_turn.text if user_turn else None,
                    )
                    for i in range(count)
                ),
                return_exceptions=True,
            )
            failed = [r for r in results if isinstance(r, BaseException)]
            if failed:
                raise failed[0]
            written = [r for r in results if not isinstance(r, BaseException)]
            generation_ids = [g for _, g in written]
            choice_id = await self.store.create_choice(story.id, action, author.id, generation_ids)
            options = tuple(ChoiceOption(i, g, n.text) for i, (n, g) in enumerate(written, 1))
            return ChoiceSet(choice_id, story, user_turn, options)

    async def choose(
        self, channel: str, choice_id: int, position: int, author: Author
    ) -> TurnResult:
        """Make option `position` of an offered choice the story's turn; the choice is
        recorded as a preference: the chosen continuation over each of the others."""
        if not isinstance(choice_id, int) or not 0 < choice_id <= MAX_ID:
            raise InvalidInput("That choice does not belong to this story.")
        author = await self._who(author)
        async with self._lock(clean_id(channel, "The channel")):
            story = await self.active_story(channel)
            await self._allow(story, author, Action.CHOOSE)
            found = await self.store.choice(choice_id)
            if found is None or found[0] != story.id:
                raise InvalidInput("That choice does not belong to this story.")
            _, action, status, generation_ids = found
            if not isinstance(position, int) or not 1 <= position <= len(generation_ids):
                raise InvalidInput(f"Choose an option from 1 to {len(generation_ids)}.")
            if status != "open" or not await self.store.close_choice(choice_id, "chosen"):
                raise InvalidInput("That choice is closed: the story has moved on.")
            chosen = generation_ids[position - 1]
            record = await self.store.generation(chosen)
            assert record is not None
            turn = await self.store.add_turn(
                story.id, action=action, kind="bot", text=record["output"], generation_id=chosen
            )
            if not is_alias(author.id):
                rejected = [g for g in generation_ids if g != chosen]
                await self.store.add_preference_pairs(chosen, rejected, author.id, "choice")
            turns = await self.store.active_turns(story.id)
            user_turn = next((t for t in turns if t.action == action and t.kind == "user"), None)
            return TurnResult(story, turn, user_turn, chosen, record["latency_s"])

    # -- feedback -------------------------------------------------------------------

    async def link_message(self, message_id: str, generation_id: int) -> None:
        """Remember that a front end's message shows this generation (reactions on the
        message are then feedback on it)."""
        message_id = clean_id(message_id, "The message id")
        if (
            not isinstance(generation_id, int)
            or not 0 < generation_id <= MAX_ID
            or not await self.store.link_message(message_id, generation_id)
        ):
            raise InvalidInput("There is no such generation to link.")

    async def record_reaction(
        self, message_id: str, user_id: str, emoji: str, *, added: bool
    ) -> bool:
        """Record (or, with `added=False`, remove) one user's emoji on a story message:
        one row per message, user and emoji (a split reply's parts keep their votes
        apart; training counts a user's emoji once per generation). Returns False when
        the message carries no story generation or the user asked to be forgotten.
        Reactions are written in batches (`ReactionRecorder`), in the order they came."""
        message_id = clean_id(message_id, "The message id")
        user_id = clean_id(user_id, "The user id")
        emoji = clean_id(emoji, "The emoji")
        value = dict(self.settings.reaction_values).get(emoji, 0.0)
        return await self.reactions.record(
            ReactionEvent(message_id, user_id, emoji, bool(added), value)
        )

    async def rate(self, channel: str, author: Author, liked: bool) -> int:
        """The author's 👍 (`liked`) or 👎 on the storyteller's last turn, for front ends
        without reactions (the terminal): stored as that reaction would be, replacing
        the opposite one. Returns the generation rated."""
        author = await self._who(author)
        story = await self.active_story(channel)
        turns = await self.store.active_turns(story.id)
        last = next((t for t in reversed(turns) if t.kind == "bot" and t.generation_id), None)
        if last is None or last.generation_id is None:
            raise NothingToRetry("The storyteller has written nothing here to rate yet.")
        if is_alias(author.id):
            raise InvalidInput("You asked to be forgotten: your feedback is not recorded.")
        values = dict(self.settings.reaction_values)
        emoji, other = ("👍", "👎") if liked else ("👎", "👍")
        await self.store.delete_feedback(last.generation_id, author.id, other)
        await self.store.set_feedback(
            last.generation_id, author.id, emoji, values.get(emoji, 1.0 if liked else -1.0)
        )
        return last.generation_id

    # -- learning switch and statistics ----------------------------------------------

    async def set_learning(self, community: str, enabled: bool, *, by: str | None) -> None:
        """Switch training on a community's stories and reactions on or off (see
        `LearningAdmin.set_enabled`)."""
        await self.learning.set_enabled(community, enabled, by=by)

    async def learning_enabled(self, community: str) -> bool:
        return await self.learning.enabled(community)

    async def feedback_stats(self, community: str | None = None) -> list[dict[str, Any]]:
        """Per adapter version: generations shown, reactions, approval rate."""
        return await self.learning.feedback_stats(community)

    async def _stored_id(self, user_id: str) -> str:
        return (await self._who(Author(user_id, ""))).id

    # -- the database, for operators ---------------------------------------------------

    async def database_status(self) -> tuple[int, int]:
        """(schema version, stories stored): what the bot says at start."""
        status = await self.store.migration_status()
        schema = max((m.version for m in status if m.applied_at), default=0)
        rows = await self.store.db.execute_fetchall("SELECT COUNT(*) FROM stories")
        return schema, int(rows[0][0])

    async def database_reachable(self) -> bool:
        """One trivial query answered (health checks bound it with a timeout)."""
        rows = await self.store.db.execute_fetchall("SELECT 1")
        return bool(rows) and rows[0][0] == 1

    async def find_story(self, channel: str) -> Story | None:
        """The channel's running story, or None."""
        return await self.store.active_story(clean_id(channel, "The channel"))

    def training_scheduler(self, schedule: TrainingSchedule) -> TrainingScheduler:
        """What runs this engine's training rounds (as child processes) on `schedule`."""
        from ..learning.scheduling import TrainingScheduler

        return TrainingScheduler(self.settings, self.store, schedule)

    # -- privacy --------------------------------------------------------------------

    async def forget_user(self, user_id: str) -> ForgetReport:
        """Delete the user's reactions and preferences, anonymise their lines (kept in
        shared stories, under an alias, never trained on), take them out of round-robin
        games, and never record their id or name again: what they do afterwards is
        stored under their alias. Their own stories stay theirs (the alias owns them)."""
        user_id = clean_id(user_id, "The user id")
        await self.reactions.flush()  # a reaction queued before this must not land after
        for story in await self.store.active_stories():
            if story.mode != "round-robin":
                continue
            async with self._lock(story.channel):
                state = await self._turn_state(story)
                if any(p.user_id == user_id for p in state.active_players):
                    await self.store.set_player_active(story.id, user_id, False)
                    if state.current is not None and state.current.user_id == user_id:
                        await self._advance_turn(story, after_seat=state.current.seat)
        feedback, pairs, turns = await self.store.forget_user(user_id)
        return ForgetReport(feedback, pairs, turns)

    async def export_user_data(self, user_id: str) -> dict[str, Any]:
        """Every row that refers to the user, as plain data (for a JSON download)."""
        await self.reactions.flush()
        return await self.store.user_data(clean_id(user_id, "The user id"))

    # -- internals ----------------------------------------------------------------

    def _builder(self, params: SamplingParams) -> ContextBuilder:
        model = self.narrator.info
        return ContextBuilder(
            model.count_tokens,
            ContextBudget(window=model.context_window, reserve=params.max_new_tokens),
        )

    @staticmethod
    def _material(story: Story, turns: list[Turn], lore: list[LoreCard]) -> StoryMaterial:
        return StoryMaterial(
            premise=story.premise,
            turns=[t.text for t in turns],
            genre=story.genre,
            memory=story.memory,
            authors_note=story.authors_note,
            lore=lore,
        )

    async def _write_bot_turn(
        self,
        story: Story,
        turns: list[Turn],
        action: int,
        user_turn: Turn | None,
        on_progress: ProgressCallback | None,
        params: SamplingParams | None = None,
        *,
        replacing: Turn | None = None,
    ) -> TurnResult:
        """Write the storyteller's turn: with a reward model served, `best_of`
        candidates at once, the best shown and the others kept as its alternatives
        (best first: a retry shows the next best before writing anew)."""
        if params is None:
            params = await self.sampling_for(story.channel)
        prompt = await self._prompt(story, turns, params)
        written = await self._narrate_best(
            story,
            prompt,
            params,
            echo_of=user_turn.text if user_turn else None,
            on_progress=on_progress,
        )
        (narration, generation_id), others = written[0], written[1:]
        turn = await self.store.add_turn(
            story.id,
            action=action,
            kind="bot",
            text=narration.text,
            generation_id=generation_id,
            position=replacing.position if replacing else None,
            replacing=replacing.id if replacing else None,
        )
        for other, other_id in others:
            await self.store.add_turn(
                story.id,
                action=action,
                kind="bot",
                text=other.text,
                generation_id=other_id,
                position=turn.position,
                status="replaced",
            )
        return TurnResult(story, turn, user_turn, generation_id, narration.output.latency_s)

    async def _prompt(self, story: Story, turns: list[Turn], params: SamplingParams) -> str:
        material = self._material(story, turns, await self.store.lore(story.id))
        return self._builder(params).build(material).text

    async def _narrate(
        self,
        story: Story,
        prompt: str,
        params: SamplingParams,
        *,
        echo_of: str | None,
        on_progress: ProgressCallback | None = None,
    ) -> tuple[Narration, int]:
        """Generate one continuation and record it (a cancelled one too)."""
        written = await self._narrate_best(
            story, prompt, params.replace(best_of=1), echo_of=echo_of, on_progress=on_progress
        )
        return written[0]

    async def _narrate_best(
        self,
        story: Story,
        prompt: str,
        params: SamplingParams,
        *,
        echo_of: str | None,
        on_progress: ProgressCallback | None = None,
    ) -> list[tuple[Narration, int]]:
        """Generate the continuations of a turn and record them (a cancelled one too):
        one, or with a reward model served and `params.best_of` > 1, that many written
        together (one prefill) and ranked by the reward model, best first."""
        if self._closing:
            raise GenerationCancelled(message=SHUTTING_DOWN)
        channel = story.channel
        await self.sync_adapter()
        adapter = await self._adapter_for(story)
        scorer = await self._scorer_for(story) if params.best_of > 1 else None
        n = params.best_of if scorer is not None else 1
        record = {"story_id": story.id, "channel": channel, "prompt": prompt}
        handles: list[GenerationHandle] = []

        def track(handle: Any) -> None:
            handles.append(handle)
            self._in_flight.setdefault(channel, set()).add(handle)
            if self._closing:  # shutting down since the request was made
                handle.cancel()

        try:
            candidates = await self.narrator.narrate_candidates(
                prompt,
                params,
                n,
                channel=channel,
                adapter=adapter[0] if adapter else None,
                adapter_path=adapter[1] if adapter else None,
                echo_of=echo_of,
                on_progress=on_progress,
                on_handle=track,
            )
        except GenerationCancelled as cancelled:
            if isinstance(cancelled.output, GenerationOutput):
                await self._record(record, params, cancelled.output, shown="")
            if self._closing:
                raise GenerationCancelled(cancelled.output, message=SHUTTING_DOWN) from None
            raise
        finally:
            in_flight = self._in_flight.get(channel, set())
            in_flight.difference_update(handles)
            if not in_flight:
                self._in_flight.pop(channel, None)
        rewards: list[float | None] = [None] * len(candidates)
        if scorer is not None and len(candidates) > 1:
            rewards = list(await scorer([prompt] * len(candidates), [c.text for c in candidates]))
        order = sorted(range(len(candidates)), key=lambda i: -(rewards[i] or 0.0))
        written = []
        for i in order:
            narration = candidates[i]
            generation_id = await self._record(
                record, narration.params, narration.output, shown=narration.text, reward=rewards[i]
            )
            written.append((narration, generation_id))
        if len(written) > 1:
            await self.store.set_candidate_group([g for _, g in written], written[0][1])
        return written

    async def _adapter_for(self, story: Story) -> tuple[str, str] | None:
        """The adapter a story's community is served when it has one of its own (name,
        path); None: the generator's default (the shared one, or a pinned one)."""
        if self._pinned is not None or story.community is None:
            return None
        own = await self.registry.promoted(story.community)
        return (own.name, str(own.path)) if own is not None else None

    async def _scorer_for(self, story: Story) -> Scorer | None:
        """The reward model that ranks a story's best-of-n candidates (its community's
        own, else the shared one), or None when none is promoted."""
        if self.rewards is None:
            return None
        return await self.rewards.scorer(story.community)

    async def _record(
        self,
        record: dict[str, Any],
        params: SamplingParams,
        output: GenerationOutput,
        *,
        shown: str,
        reward: float | None = None,
    ) -> int:
        model = self.narrator.info
        return await self.store.record_generation(
            reward=reward,
            **record,
            output=shown,
            raw_output=output.text,
            params=params.to_dict(),
            model_id=model.model_id,
            adapter_id=None if output.adapter == BASE_ADAPTER else output.adapter,
            prompt_tokens=output.prompt_tokens,
            output_tokens=len(output.token_ids),
            finish_reason="cancelled"
            if not shown and output.finish_reason == "cancelled"
            else output.finish_reason,
            latency_s=output.latency_s,
            ttft_s=output.ttft_s,
        )


SHUTTING_DOWN = (
    "The storyteller was stopped: the bot is shutting down. Your line is kept; "
    "continue when it is back."
)


async def _in_daemon_thread(function: Callable[..., T], *args: object) -> T:
    """`asyncio.to_thread` for start-up work that nobody needs once it is cancelled
    (loading a model takes seconds): `asyncio.run` waits for the default executor's
    threads before it returns, so a process stopped while loading would wait for the
    load to finish; a daemon thread is left behind instead."""
    loop = asyncio.get_running_loop()
    future: asyncio.Future[T] = loop.create_future()

    def settle(result: T | None, error: BaseException | None) -> None:
        if future.done():  # cancelled meanwhile
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)  # type: ignore[arg-type]

    def work() -> None:
        try:
            result, error = function(*args), None
        except BaseException as exc:  # handed to the awaiting task
            result, error = None, exc
        with contextlib.suppress(RuntimeError):  # the loop has closed: nobody waits
            loop.call_soon_threadsafe(settle, result, error)

    threading.Thread(target=work, name=f"start-{function.__name__}", daemon=True).start()
    return await future
