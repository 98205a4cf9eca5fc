"""The story engine: the async API that every front end (CLI, bot, benchmarks) drives.

A façade. One active story per channel; operations on one channel are serialised by a
per-channel lock, different channels proceed concurrently (their generations share the
generator). All state lives in the database, so a restarted engine resumes every open
story as it was. The work is done by collaborators, one per concern:

    stories    the shared part: a channel's story, who acts and may, locks, prompts
    teller     opening, a line and the reply, retry, swipe, undo, the end   (telling.py)
    writer     generations in flight, best-of-n, generation records         (writing.py)
    games      round-robin seats, turns and deadlines                       (games.py)
    companion  continuations offered together, the one chosen               (companion.py)
    notes      style, memory, author's note, lore, imports, context viewer  (notes.py)
    files      recap, Markdown, save and load                               (files.py)
    ideas      premises, drafted character and setting cards                (ideas.py)
    illustrator  pictures for turns, drawn by the image backend     (illustrations.py)
    feedback   reactions and ratings                                        (feedback.py)
    privacy    a person's data: export and forget                           (privacy.py)
    adapters   which adapter and reward model serve a story                 (adapters.py)
    learning   the learning loop as admins see it                (learning/admin.py)
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from ..config import Settings
from ..learning.admin import LearningAdmin
from ..learning.best_of import RewardSource
from ..learning.registry import AdapterRegistry
from ..records import Story
from ..safety import SafetyFilter
from ..serving.generation import Generator
from ..serving.images import PictureBackend, make_picture_backend
from ..storage import StoryStore
from ..storage.store import Store
from .adapters import StoryAdapters
from .companion import Companion
from .feedback import Feedback
from .files import StoryFiles
from .games import RoundRobin
from .ideas import Ideas
from .illustrations import Illustrator
from .narrator import Narrator
from .notes import Notes
from .privacy import Privacy
from .reactions import ReactionRecorder
from .stories import Stories, StoryView
from .telling import Teller
from .writing import Writer

if TYPE_CHECKING:
    from ..learning.scheduling import TrainingSchedule, TrainingScheduler

__all__ = ["StoryEngine", "StoryView"]

log = logging.getLogger(__name__)
T = TypeVar("T")


def _by(part: str, method: Callable[..., Any]) -> Any:
    """The engine's method that is `method` of its collaborator `part` (same name,
    signature and docstring)."""
    if inspect.iscoroutinefunction(method):

        async def call_async(self: StoryEngine, *args: Any, **kwargs: Any) -> Any:
            return await method(getattr(self, part), *args, **kwargs)

        return functools.wraps(method)(call_async)

    def call(self: StoryEngine, *args: Any, **kwargs: Any) -> Any:
        return method(getattr(self, part), *args, **kwargs)

    return functools.wraps(method)(call)


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
        store: StoryStore | None = None,
        adapter: str | None = None,
        pictures: PictureBackend | None = None,
    ) -> None:
        """`adapter`: serve this registry version ("3" or "v3") or "base" (the bare base
        model) instead of following the registry's promotions (`chat --adapter`).
        `pictures`: what draws illustrations (default: the one the settings configure,
        if any)."""
        self.settings = settings
        self.store: StoryStore = store or Store(settings.database)
        self.registry = AdapterRegistry(self.store, settings.adapter_dir)
        self.reactions = ReactionRecorder(self.store)
        self.stories = Stories(settings, self.store)
        self.adapters = StoryAdapters(settings, self.registry, generator, pinned=adapter)
        self.writer = Writer(self.stories, self.adapters)
        self.games = RoundRobin(self.stories)
        self.teller = Teller(self.stories, self.games, self.writer)
        self.companion = Companion(self.stories, self.games, self.teller)
        self.files = StoryFiles(self.stories, self.games)
        self.notes = Notes(self.stories, self.files)
        self.ideas = Ideas(self.stories, self.notes)
        self.illustrator = Illustrator(self.stories)
        self.illustrator.backend = pictures
        self.feedback = Feedback(self.stories, self.reactions)
        self.privacy = Privacy(self.stories, self.games, self.reactions)
        self.learning = LearningAdmin(
            self.store,
            self.registry,
            lambda: self.rewards,
            self.sync_adapter,
            self.stories.stored_id,
        )
        """The learning loop as admins see it: switch, what is served, versions,
        statistics, rollback."""
        self._closed = False

    # -- lifecycle ----------------------------------------------------------------

    async def start(self) -> StoryEngine:
        await self.store.open()
        if self.adapters.generator is None:
            from ..serving.generators import make_generator

            self.adapters.generator = await _in_daemon_thread(make_generator, self.settings)
        generator = self.adapters.generator
        safety = SafetyFilter(
            max_input_chars=self.settings.max_input_chars,
            blocklist=self.settings.blocklist,
            special_tokens=generator.info.special_tokens,
        )
        self.stories.narrator_or_none = Narrator(generator, safety)
        await self.registry.open()
        if self.rewards is None:
            self.rewards = RewardSource(
                self.settings, self.store, lambda: self.narrator.local_model
            )
        await self.sync_adapter()
        if self.illustrator.backend is None:
            self.illustrator.backend = make_picture_backend(self.settings)
        return self

    async def close(self, *, grace_s: float = 5.0) -> None:
        """Stop: generations in progress are cancelled and recorded as such (within
        `grace_s`), queued reactions are written, then the generator and the database
        are closed (the database checkpointed). Safe to call more than once."""
        if self._closed:
            return
        self.cancel_all()

        async def drain() -> None:  # every channel's operation ends (and is recorded)
            for lock in list(self.stories.locks.values()):
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
            if self.illustrator.backend is not None:
                await self.illustrator.backend.close()
            if self.adapters.generator is not None:
                await self.adapters.generator.close()
        finally:
            await self.store.close()

    async def __aenter__(self) -> StoryEngine:
        return await self.start()

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    @property
    def closing(self) -> bool:
        return self.writer.closing

    @property
    def narrator(self) -> Narrator:
        return self.stories.narrator

    @property
    def safety(self) -> SafetyFilter:
        return self.stories.safety

    @property
    def clock(self) -> Callable[[], float]:
        """Wall clock for turn deadlines (tests replace it)."""
        return self.stories.clock

    @clock.setter
    def clock(self, clock: Callable[[], float]) -> None:
        self.stories.clock = clock

    @property
    def rewards(self) -> RewardSource | None:
        """Where best-of-n gets its reward models (set by `start`)."""
        return self.adapters.rewards

    @rewards.setter
    def rewards(self, rewards: RewardSource | None) -> None:
        self.adapters.rewards = rewards

    sync_adapter = _by("adapters", StoryAdapters.sync)
    cancel_all = _by("writer", Writer.cancel_all)

    # -- reading a story ---------------------------------------------------------------

    active_story = _by("stories", Stories.active)
    view = _by("stories", Stories.view)
    sampling_for = _by("stories", Stories.sampling_for)
    is_generating = _by("writer", Writer.is_generating)
    queue_position = _by("writer", Writer.queue_position)
    recap = _by("files", StoryFiles.recap)
    export_markdown = _by("files", StoryFiles.export_markdown)

    async def open_stories(self) -> list[Story]:
        return await self.store.active_stories()

    find_story = _by("stories", Stories.find)

    # -- telling ----------------------------------------------------------------------

    start_story = _by("teller", Teller.start_story)
    continue_story = _by("teller", Teller.continue_story)
    retry = _by("teller", Teller.retry)
    alternatives = _by("teller", Teller.alternatives)
    choose_alternative = _by("teller", Teller.choose_alternative)
    swipe = _by("teller", Teller.swipe)
    undo = _by("teller", Teller.undo)
    end_story = _by("teller", Teller.end_story)
    request_stop = _by("teller", Teller.request_stop)
    check_allowed = _by("stories", Stories.check_allowed)

    def stop(self, channel: str) -> bool:
        """Cancel the channel's generation in progress (the operator: no permission
        check; usable from a signal handler). True if there was one."""
        return self.writer.cancel(channel)

    # -- round-robin games and companion choices ---------------------------------------

    turn_state = _by("games", RoundRobin.turn_state)
    join = _by("games", RoundRobin.join)
    leave = _by("games", RoundRobin.leave)
    pass_turn = _by("games", RoundRobin.pass_turn)
    set_turn_timeout = _by("games", RoundRobin.set_turn_timeout)
    expire_turns = _by("games", RoundRobin.expire_turns)
    check_turn = _by("games", RoundRobin.check_turn)
    offer_choices = _by("companion", Companion.offer_choices)
    choose = _by("companion", Companion.choose)

    # -- style, notes and lore ------------------------------------------------------------

    configure_channel = _by("notes", Notes.configure_channel)
    set_memory = _by("notes", Notes.set_memory)
    set_authors_note = _by("notes", Notes.set_authors_note)
    add_lore = _by("notes", Notes.add_lore)
    remove_lore = _by("notes", Notes.remove_lore)
    lore = _by("notes", Notes.lore)
    import_lore = _by("notes", Notes.import_lore)
    lore_as_world_info = _by("notes", Notes.lore_as_world_info)
    context = _by("notes", Notes.context)
    save_story = _by("files", StoryFiles.save_story)
    load_story = _by("files", StoryFiles.load_story)
    opening_prompt = _by("ideas", Ideas.opening_prompt)
    suggest_premise = _by("ideas", Ideas.suggest_premise)
    draft_card = _by("ideas", Ideas.draft_card)
    illustrate = _by("illustrator", Illustrator.illustrate)
    order_picture = _by("illustrator", Illustrator.order_picture)
    draw_picture = _by("illustrator", Illustrator.draw_picture)

    # -- feedback, learning and privacy ------------------------------------------------

    link_message = _by("feedback", Feedback.link_message)
    record_reaction = _by("feedback", Feedback.record_reaction)
    rate = _by("feedback", Feedback.rate)
    forget_user = _by("privacy", Privacy.forget_user)
    export_user_data = _by("privacy", Privacy.export_user_data)

    async def set_learning(self, community: str, enabled: bool, *, by: str | None) -> None:
        """Switch training on a community's stories and reactions on or off (see
        `LearningAdmin.set_enabled`)."""
        await self.learning.set_enabled(community, enabled, by=by)

    async def learning_enabled(self, community: str) -> bool:
        return await self.learning.enabled(community)

    async def feedback_stats(self, community: str | None = None) -> list[dict[str, Any]]:
        """Per adapter version: generations shown, reactions, approval rate."""
        return await self.learning.feedback_stats(community)

    def training_scheduler(self, schedule: TrainingSchedule) -> TrainingScheduler:
        """What runs this engine's training rounds (as child processes) on `schedule`."""
        from ..learning.scheduling import TrainingScheduler

        return TrainingScheduler(self.settings, self.store, schedule)

    # -- the database, for operators ---------------------------------------------------

    async def database_status(self) -> tuple[int, int]:
        """(schema version, stories stored): what the bot says at start."""
        return await self.store.schema_version(), await self.store.story_count()

    async def database_reachable(self) -> bool:
        """One trivial query answered (health checks bound it with a timeout)."""
        return await self.store.ping()


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
