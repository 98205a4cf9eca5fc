"""What a server's admins (and the bot's operator) ask of the learning loop: is it on,
what is served, which versions exist, how the audience reacts, go back one version.

`StoryEngine.learning` is one; front ends ask it rather than the registry or the
database, so those stay the engine's business.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ..errors import InvalidInput
from ..records import DIRECT_MESSAGES
from ..safety import clean_id

if TYPE_CHECKING:
    from ..storage import FeedbackRecords
    from .best_of import RewardSource
    from .registry import AdapterRegistry, AdapterVersion
    from .stats import FeedbackSummary


@dataclass(frozen=True)
class Serving:
    """What a community's stories are told with."""

    own: AdapterVersion | None
    """Its own adapter lineage's promoted version."""
    shared: AdapterVersion | None
    """The shared lineage's, served where a community has none of its own."""
    reward_model: str | None
    """The reward model its best-of-n candidates are ranked by (None: best-of-n off)."""

    @property
    def adapter(self) -> AdapterVersion | None:
        return self.own or self.shared

    def describe(self) -> str:
        adapter = (
            f"{self.own.name} (this server's own)"
            if self.own
            else f"{self.shared.name} (shared)"
            if self.shared
            else "the base model"
        )
        ranked = self.reward_model
        return adapter + (f", best of the continuations by reward model {ranked}" if ranked else "")


class LearningAdmin:
    def __init__(
        self,
        store: FeedbackRecords,
        registry: AdapterRegistry,
        rewards: Callable[[], RewardSource | None],
        resync: Callable[[], Awaitable[object]],
        actor: Callable[[str], Awaitable[str]],
    ) -> None:
        """`rewards`: the engine's reward source (once started); `resync`: serve what
        the registry now promotes; `actor`: a user id as it is stored (an alias for
        someone who asked to be forgotten)."""
        self._store, self._registry = store, registry
        self._rewards, self._resync, self._actor = rewards, resync, actor

    async def set_enabled(self, community: str, enabled: bool, *, by: str | None) -> None:
        """Switch training on a community's stories and reactions on or off (off until
        someone switches it on). Off also leaves out what was collected while it was on."""
        community = clean_id(community, "The community")
        if community == DIRECT_MESSAGES:
            raise InvalidInput("Private sessions are never trained on.")
        await self._store.set_learning(
            community, bool(enabled), await self._actor(by) if by is not None else None
        )

    async def enabled(self, community: str) -> bool:
        return await self._store.learning_enabled(clean_id(community, "The community"))

    async def serving(self, community: str | None) -> Serving:
        community = _community(community)
        rewards = self._rewards()
        return Serving(
            await self._registry.promoted(community) if community else None,
            await self._registry.promoted(None),
            await rewards.registry.serving_name(community) if rewards else None,
        )

    async def versions(self, community: str | None) -> list[AdapterVersion]:
        """A lineage's adapter versions, oldest first (None: the shared lineage)."""
        return await self._registry.lineage(_community(community))

    async def rollback(
        self, community: str | None
    ) -> tuple[AdapterVersion | None, AdapterVersion | None]:
        """Serve the lineage's version before the promoted one (or, with none left, what
        comes after it: the shared adapter, the base model). (before, now)."""
        community = _community(community)
        before = await self._registry.promoted(community)
        now = await self._registry.rollback(community)
        await self._resync()
        return before, now

    async def summary(self, community: str | None) -> FeedbackSummary:
        """Approval per adapter version and reactions per day (`/storyadmin stats`)."""
        from .stats import feedback_summary

        return await feedback_summary(self._store, _community(community))

    async def feedback_stats(self, community: str | None = None) -> list[dict[str, object]]:
        """Per adapter version: generations shown, reactions, approval rate."""
        return await self._store.feedback_stats(_community(community))


def _community(community: str | None) -> str | None:
    return clean_id(community, "The community") if community is not None else None
