"""What storage offers, one `Protocol` per aggregate: the engine and the learning code
depend on these, not on `Store` and its SQLite repositories.

    StoryRecords        stories, turns and their alternatives, lore, channel settings
    GameRecords         round-robin seats, whose turn it is, each channel's timeout
    FeedbackRecords     generations, messages, reactions, choices and preference pairs,
                        each community's learning switch, what training reads
    PeopleRecords       who is in the data: export and forgetting
    TrainingRunRecords  training runs
    RewardModelRecords  reward model versions
    AdapterRecords      adapter versions (the adapter registry's rows)
    DatabaseLifecycle   open, close, is it there, which schema

Combined: `TellingRecords` (a story and what telling it generated and gathered),
`EngineRecords` (what the story collaborators share), `StoryStore` (everything, with the
lifecycle: what the engine holds). `Store` (store.py) is all of them over one SQLite
connection; tests/storage/test_interfaces.py fails when a repository and its protocol
drift apart, and pyright checks that `Store` is a `StoryStore` (store.py).

Also here, because the protocols speak it: `ReactionEvent`, and how a forgotten person
appears (`is_alias`, `FORMER_PLAYER`).
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, Self

if TYPE_CHECKING:
    from ..records import LoreCard, Player, Story, Turn
    from ..saves import SavedStory

__all__ = [
    "FORMER_PLAYER",
    "AdapterRecords",
    "DatabaseLifecycle",
    "EngineRecords",
    "FeedbackRecords",
    "GameRecords",
    "PeopleRecords",
    "ReactionEvent",
    "RewardModelRecords",
    "StoryRecords",
    "StoryStore",
    "TellingRecords",
    "TrainingRunRecords",
    "is_alias",
]


# -- the vocabulary ------------------------------------------------------------------


@dataclass(frozen=True)
class ReactionEvent:
    """One reaction added to (or removed from) a message."""

    message_id: str
    user_id: str
    emoji: str
    added: bool
    value: float = 0.0


FORMER_PLAYER = "a former player"
"""The name that replaces a forgotten user's, wherever a name is shown."""

ALIAS_PREFIX = "forgotten:"
"""How the alias that stands for a forgotten user begins."""


def is_alias(user_id: str | None) -> bool:
    """Whether a user id is the alias of someone forgotten."""
    return bool(user_id and user_id.startswith(ALIAS_PREFIX))


# -- one protocol per aggregate ------------------------------------------------------


class StoryRecords(Protocol):
    """Stories, their turns (with the alternatives a retry or best-of-n wrote), lore
    cards and each channel's settings."""

    async def create_story(
        self,
        channel: str,
        premise: str,
        *,
        genre: str | None,
        mode: str,
        created_by: str | None,
        community: str | None = None,
    ) -> Story:
        """A new active story in `channel`."""
        ...

    async def import_story(
        self,
        channel: str,
        saved: SavedStory,
        *,
        loaded_by: str,
        community: str | None,
    ) -> Story:
        """A saved story started in `channel`, whole or not at all; its lines are never
        trained on."""
        ...

    async def story(self, story_id: int) -> Story | None:
        """A story by id."""
        ...

    async def active_story(self, channel: str) -> Story | None:
        """The channel's active story, if any."""
        ...

    async def latest_story(self, channel: str) -> Story | None:
        """The channel's newest story, active or ended."""
        ...

    async def active_stories(self) -> list[Story]:
        """Every active story, oldest first."""
        ...

    async def update_story(self, story_id: int, **fields: Any) -> None:
        """Set `memory`, `authors_note` or `genre` (anything else is a ValueError)."""
        ...

    async def end_story(self, story_id: int) -> None:
        """Mark a story ended."""
        ...

    async def story_count(self) -> int:
        """How many stories are stored."""
        ...

    async def next_action(self, story_id: int) -> int:
        """The number of the story's next action (what one undo takes back)."""
        ...

    async def add_turn(
        self,
        story_id: int,
        *,
        action: int,
        kind: str,
        text: str,
        author_id: str | None = None,
        author_name: str | None = None,
        generation_id: int | None = None,
        position: int | None = None,
        replacing: int | None = None,
        train_excluded: bool = False,
        status: str = "active",
    ) -> Turn:
        """Append a turn (with `replacing`: in that turn's place, atomically)."""
        ...

    async def turn(self, turn_id: int) -> Turn | None:
        """A turn by id."""
        ...

    async def active_turns(self, story_id: int) -> list[Turn]:
        """The story as it reads now, in order."""
        ...

    async def alternatives(self, story_id: int, position: int) -> list[Turn]:
        """Bot turns written for one position (the retry stack), oldest first."""
        ...

    async def next_best_candidate(self, turn: Turn) -> Turn | None:
        """The best-of-n candidate scored next below `turn` (what a retry shows), or None."""
        ...

    async def undo_action(self, story_id: int, action: int) -> None:
        """Mark every turn of `action` undone, its alternatives included."""
        ...

    async def swap_active(self, old_id: int, new_id: int) -> None:
        """Make `new_id` the active turn in place of `old_id`, atomically."""
        ...

    async def upsert_lore(self, story_id: int, card: LoreCard) -> None:
        """Add a lore card, or replace the story's card of the same name."""
        ...

    async def import_lore(self, story_id: int, cards: list[LoreCard], memory: str | None) -> None:
        """Lore cards and (with `memory`) the story's memory, whole or not at all."""
        ...

    async def lore(self, story_id: int) -> list[LoreCard]:
        """The story's lore cards, oldest first."""
        ...

    async def remove_lore(self, story_id: int, name: str) -> bool:
        """Remove a lore card by name (any case). False if there was none."""
        ...

    async def channel_settings(self, channel: str) -> tuple[str | None, dict[str, Any]]:
        """The channel's (preset, sampling overrides)."""
        ...

    async def set_channel_settings(
        self, channel: str, preset: str | None, sampling: dict[str, Any]
    ) -> None:
        """Set the channel's preset and sampling overrides."""
        ...


class GameRecords(Protocol):
    """Round-robin games: seats, whose turn it is and its deadline, each channel's
    turn timeout."""

    async def players(self, story_id: int) -> list[Player]:
        """The story's players, by seat."""
        ...

    async def add_player(self, story_id: int, user_id: str, user_name: str) -> None:
        """Seat a player at the end of the order (a returning player too)."""
        ...

    async def set_player_active(self, story_id: int, user_id: str, active: bool) -> None:
        """Take a player out of the order, or back in."""
        ...

    async def set_turn(self, story_id: int, seat: int | None, deadline: float | None) -> None:
        """Whose turn it is (a seat) and until when (None: nobody's)."""
        ...

    async def turn_pointer(self, story_id: int) -> tuple[int | None, float | None]:
        """(seat, deadline) of the turn now."""
        ...

    async def overdue_turns(
        self, now: float, communities: Collection[str] | None = None
    ) -> list[str]:
        """The channels whose turn's deadline has passed, the most overdue first; with
        `communities`, only stories of those communities (None: every story's)."""
        ...

    async def turn_timeout(self, channel: str) -> int | None:
        """The channel's turn timeout in seconds (None: the default)."""
        ...

    async def set_turn_timeout(self, channel: str, seconds: int) -> None:
        """Set the channel's turn timeout."""
        ...


class FeedbackRecords(Protocol):
    """What the audience gives: generations and the messages that show them, reactions,
    choices and preference pairs; each community's learning switch; and what training
    reads of them."""

    async def record_generation(
        self,
        *,
        story_id: int | None,
        channel: str | None,
        prompt: str,
        output: str,
        raw_output: str,
        params: dict[str, Any],
        model_id: str,
        adapter_id: str | None,
        prompt_tokens: int,
        output_tokens: int,
        finish_reason: str,
        latency_s: float,
        ttft_s: float | None,
        reward: float | None = None,
        candidate_of: int | None = None,
    ) -> int:
        """Record a generation as written and as shown; its id."""
        ...

    async def set_candidate_group(self, generation_ids: list[int], shown: int) -> None:
        """Mark best-of-n candidates as one group, named by the one shown."""
        ...

    async def generation(self, generation_id: int) -> dict[str, Any] | None:
        """A generation's record by id."""
        ...

    async def link_message(self, message_id: str, generation_id: int) -> bool:
        """Note that a message shows a generation. False if there is no such generation."""
        ...

    async def generation_for_message(self, message_id: str) -> int | None:
        """The generation a message shows."""
        ...

    async def set_feedback(
        self, generation_id: int, user_id: str, emoji: str, value: float, message_id: str = ""
    ) -> None:
        """One user's emoji on one message showing a generation (set, or set again)."""
        ...

    async def delete_feedback(
        self, generation_id: int, user_id: str, emoji: str, message_id: str | None = None
    ) -> None:
        """Take a vote back: from one message, or (None) from every message."""
        ...

    async def apply_reactions(self, events: Sequence[ReactionEvent]) -> list[bool]:
        """Record a batch of reaction events in order, atomically; whether each counted."""
        ...

    async def feedback(self, generation_id: int) -> list[tuple[str, str, float]]:
        """The votes on a generation: (user, emoji, value)."""
        ...

    async def create_choice(
        self, story_id: int, action: int, user_id: str | None, generation_ids: list[int]
    ) -> int:
        """Offer continuations to choose from; the choice's id."""
        ...

    async def choice(self, choice_id: int) -> tuple[int, int, str, list[int]] | None:
        """(story_id, action, status, generation ids by position) of a choice."""
        ...

    async def close_choice(self, choice_id: int, status: str) -> bool:
        """Close an open choice. False if it was not open."""
        ...

    async def expire_open_choices(self, story_id: int) -> None:
        """Expire the story's open choices."""
        ...

    async def add_preference_pairs(
        self, chosen: int, rejected: list[int], user_id: str | None, source: str
    ) -> None:
        """`chosen` preferred over each of `rejected`."""
        ...

    async def choices_among(self, group: list[int], user_id: str) -> set[int]:
        """The generations of `group` that the user's preference pairs name."""
        ...

    async def replace_choice(
        self, group: list[int], chosen: int, rejected: list[int], user_id: str
    ) -> None:
        """The user's preference among `group` is now `chosen` over `rejected` (their
        earlier pairs among them replaced, atomically)."""
        ...

    async def import_feedback(self, rows: list[dict[str, Any]], batch: str) -> dict[str, int]:
        """Store checked imported feedback rows, atomically; counts of what was stored."""
        ...

    async def preference_pairs(self) -> list[tuple[int, int, str | None, str]]:
        """Every preference pair: (chosen, rejected, user, source)."""
        ...

    async def learning_enabled(self, community: str) -> bool:
        """Whether the community's learning switch is on (off until switched on)."""
        ...

    async def set_learning(self, community: str, enabled: bool, updated_by: str | None) -> None:
        """Switch the community's learning on or off."""
        ...

    async def trainable_story_ids(self) -> set[int]:
        """Stories that may be trained on."""
        ...

    async def new_feedback_count(self, since: str | None, community: str | None = None) -> int:
        """Votes and choices on trainable stories since a database timestamp."""
        ...

    async def learning_communities(self) -> list[str]:
        """The communities whose learning is on."""
        ...

    async def feedback_stats(self, community: str | None) -> list[dict[str, Any]]:
        """Per adapter version: generations shown, reacted to, liked, disliked, approval."""
        ...

    async def trainable_generations(
        self, community: str | None, *, scored_candidates: bool = False
    ) -> dict[int, dict[str, Any]]:
        """Finished generations of trainable stories, by id."""
        ...

    async def excluded_lines(self) -> dict[int, list[str]]:
        """Per story, the lines of users who asked to be forgotten."""
        ...

    async def pair_weights(self) -> dict[tuple[int, int], float]:
        """Each stored preference pair's weight."""
        ...

    async def retried_generations(self) -> list[tuple[int, int]]:
        """(replaced, replacement) for every storyteller turn a retry replaced."""
        ...

    async def counted_votes(self) -> list[tuple[int, str, float]]:
        """(generation, user, value) of every vote that counts."""
        ...

    async def round_bounds(self) -> list[int]:
        """The newest generation each training round's data reached, in order."""
        ...

    async def votes_per_day(
        self, since: str, community: str | None
    ) -> dict[str, tuple[int, int, int]]:
        """Per day from `since`: votes that like, dislike, and neither."""
        ...


class PeopleRecords(Protocol):
    """The people in the data: whether someone was forgotten, forgetting them, and
    everything stored about them."""

    async def is_forgotten(self, user_id: str) -> bool:
        """Whether the user asked to be forgotten."""
        ...

    async def forgotten_alias(self, user_id: str) -> str | None:
        """The alias that stands for a forgotten user, or None if they are not."""
        ...

    async def forget_user(self, user_id: str) -> tuple[int, int, int]:
        """Forget a user: (votes deleted, preference pairs deleted, turns anonymised)."""
        ...

    async def user_data(self, user_id: str) -> dict[str, Any]:
        """Every row that refers to the user, table by table, as plain data."""
        ...


class TrainingRunRecords(Protocol):
    """Training runs: started, given a version, finished, failed or interrupted; and
    the requests a front end leaves for a training worker."""

    async def request_round(self, reason: str, community: str | None = None) -> int:
        """Note that a lineage's round is due; the lineage's waiting request if any."""
        ...

    async def take_round_request(
        self, worker: str, *, lease_s: float = 600.0
    ) -> tuple[int, str | None, str] | None:
        """The oldest waiting request (or one whose lease ran out), taken by `worker`:
        (id, community, reason)."""
        ...

    async def renew_round_request(self, request_id: int, worker: str) -> bool:
        """The taken request's lease starts again; False if another worker took it."""
        ...

    async def finish_round_request(self, request_id: int, outcome: str) -> None:
        """How a taken request's round ended."""
        ...

    async def round_requests(self) -> list[dict[str, Any]]:
        """Every request, newest first."""
        ...

    async def interrupt_training_runs(self) -> None:
        """Mark the runs still running failed, interrupted (hold the round lock)."""
        ...

    async def start_training_run(self, method: str, community: str | None = None) -> int:
        """Record a run that starts now; its id."""
        ...

    async def fail_training_run(self, run_id: int, exc: BaseException) -> None:
        """Mark a run failed with what escaped it."""
        ...

    async def finish_training_run(
        self,
        run_id: int,
        *,
        version: int | None,
        error: str | None = None,
        data_until: int | None = None,
    ) -> None:
        """Mark a run finished (or skipped, with `error`)."""
        ...

    async def set_training_run_version(
        self, run_id: int, version: int, data_until: int | None, method: str | None = None
    ) -> None:
        """The adapter version a run registered, the newest generation it read, and the
        method it trained (None: the one it began with)."""
        ...

    async def last_training_start(self, community: str | None = None) -> str | None:
        """When a lineage's newest run started (a database timestamp), or None."""
        ...


class RewardModelRecords(Protocol):
    """Reward model versions: at most one promoted per lineage (a community's, or the
    shared one)."""

    async def add_reward_model(
        self,
        version: int,
        path: str,
        *,
        community: str | None,
        metrics: dict[str, Any],
        data_counts: dict[str, Any],
    ) -> None:
        """Register a reward model version (a candidate)."""
        ...

    async def reward_model(self, version: int) -> dict[str, Any] | None:
        """A reward model version's row."""
        ...

    async def reward_models(self) -> list[dict[str, Any]]:
        """Every reward model version, of every lineage, oldest first."""
        ...

    async def promoted_reward_model(self, community: str | None) -> dict[str, Any] | None:
        """The lineage's promoted reward model, if any."""
        ...

    async def newest_reward_model_version(self) -> int:
        """The highest version registered (0: none)."""
        ...

    async def promote_reward_model(self, version: int) -> None:
        """Promote a version in its lineage, retiring the one before, atomically."""
        ...

    async def reject_reward_model(self, version: int) -> None:
        """Reject a candidate."""
        ...

    async def rollback_reward_model(self, community: str | None) -> int | None:
        """Reject the lineage's promoted version and promote the one before; the version
        promoted now (None: none)."""
        ...


class AdapterRecords(Protocol):
    """Adapter versions: the adapter registry's rows, at most one promoted per lineage."""

    async def adapter_versions(self) -> set[int]:
        """Every registered version."""
        ...

    async def newest_adapter_version(self) -> int:
        """The highest version registered (0: none)."""
        ...

    async def add_adapter(
        self,
        version: int,
        path: str,
        *,
        parent_version: int | None,
        method: str,
        metrics: dict[str, Any],
        data_counts: dict[str, Any],
        community: str | None,
    ) -> None:
        """Register an adapter version (a candidate)."""
        ...

    async def adapter(self, version: int) -> dict[str, Any] | None:
        """An adapter version's row."""
        ...

    async def adapters(
        self, community: str | None = None, *, every: bool = True
    ) -> list[dict[str, Any]]:
        """Every version (`every`), or one lineage's, oldest first."""
        ...

    async def promoted_adapter(self, community: str | None) -> dict[str, Any] | None:
        """The lineage's promoted adapter, if any."""
        ...

    async def set_adapter_metrics(self, version: int, metrics: dict[str, Any]) -> None:
        """Replace a version's metrics."""
        ...

    async def promote_adapter(self, version: int, community: str | None) -> None:
        """Promote a version in a lineage, retiring the one before, atomically."""
        ...

    async def reject_adapter(self, version: int) -> None:
        """Reject a candidate."""
        ...

    async def roll_back_adapter(self, current: int, community: str | None) -> None:
        """Reject the promoted `current` and promote again the lineage's most recently
        promoted retired version, if there is one."""
        ...

    async def data_window(self, community: str | None) -> tuple[int, int]:
        """A round's data window: (the newest generation the lineage's served versions
        were trained on, the newest generation now)."""
        ...


class DatabaseLifecycle(Protocol):
    """The database itself, as its holder (the engine) uses it."""

    async def open(self, *, migrate: bool = True, create: bool = True) -> Self:
        """Connect (applying pending migrations); itself."""
        ...

    async def close(self) -> None:
        """Checkpoint and close; safe to call twice."""
        ...

    async def schema_version(self) -> int:
        """The newest migration applied (0: an empty database)."""
        ...

    async def ping(self) -> bool:
        """One trivial query answered."""
        ...

    def round_lock(self) -> AbstractAsyncContextManager[None]:
        """One training run at a time across every process on this database."""
        ...


# -- combined ------------------------------------------------------------------------


class TellingRecords(StoryRecords, FeedbackRecords, Protocol):
    """A story and what telling it generated and gathered (generations, votes,
    choices): what the teller, writer, companion, notes and feedback use."""


class EngineRecords(StoryRecords, GameRecords, FeedbackRecords, PeopleRecords, Protocol):
    """What the story collaborators share through `Stories.store`: every aggregate but
    training runs, reward models and adapters."""


class StoryStore(
    StoryRecords,
    GameRecords,
    FeedbackRecords,
    PeopleRecords,
    TrainingRunRecords,
    RewardModelRecords,
    AdapterRecords,
    DatabaseLifecycle,
    Protocol,
):
    """Every aggregate and the database's lifecycle: what the engine holds (`Store`)."""
