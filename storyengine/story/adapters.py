"""Which adapter writes a story, and which reward model ranks its candidates.

The generator serves the registry's promoted shared adapter by default (or a version
pinned at start, `chat --adapter`); a community with a promoted adapter of its own gets
it per request. Promotions are picked up before every generation, without a restart.
"""

from __future__ import annotations

import logging

from ..config import Settings
from ..errors import InvalidInput
from ..learning.best_of import RewardSource, Scorer
from ..learning.registry import AdapterRegistry
from ..records import Story
from ..serving.generation import BASE_ADAPTER, Generator

log = logging.getLogger(__name__)


class StoryAdapters:
    def __init__(
        self,
        settings: Settings,
        registry: AdapterRegistry,
        generator: Generator | None = None,
        *,
        pinned: str | None = None,
    ) -> None:
        """`generator`: a ready one (else the engine's start makes it). `pinned`: serve
        this registry version ("3" or "v3") or "base" (the bare base model) instead of
        following the registry's promotions."""
        self.settings = settings
        self.registry = registry
        self.pinned = pinned.strip().lower() if pinned else None
        self.generator = generator
        self.rewards: RewardSource | None = None
        """Where best-of-n gets its reward models (set by the engine's start)."""
        self._serving: str | None = None
        """The adapter being served (its registry name), None for the configured one."""

    async def sync(self) -> str | None:
        """Serve the registry's promoted adapter (or, with none promoted, the configured
        one): a newly promoted version is loaded without a restart, generations in flight
        finish on the old one. Called before every generation; cheap when nothing changed."""
        if self.pinned is not None:
            return await self._serve_pinned()
        promoted = await self.registry.promoted()
        wanted = promoted.name if promoted else None
        if wanted != self._serving:
            assert self.generator is not None
            if promoted is not None:
                await self.generator.use_adapter(promoted.name, str(promoted.path))
            else:
                await self.generator.use_adapter(
                    "default" if self.settings.adapter else BASE_ADAPTER
                )
            log.info("now serving adapter %s", wanted or self.settings.adapter or "none")
            self._serving = wanted
        return wanted

    async def _serve_pinned(self) -> str | None:
        assert self.generator is not None and self.pinned is not None
        if self._serving == self.pinned:
            return None if self.pinned == "base" else self.pinned
        if self.pinned == "base":
            await self.generator.use_adapter(BASE_ADAPTER)
        else:
            number = self.pinned.removeprefix("v")
            version = await self.registry.get(int(number)) if number.isdigit() else None
            if version is None:
                raise InvalidInput(f"There is no adapter version {self.pinned!r} to serve.")
            await self.generator.use_adapter(version.name, str(version.path))
        self._serving = self.pinned
        return None if self.pinned == "base" else self.pinned

    async def adapter_for(self, story: Story) -> tuple[str, str] | None:
        """The adapter a story's community is served when it has one of its own (name,
        path); None: the generator's default (the shared one, or a pinned one)."""
        if self.pinned is not None or story.community is None:
            return None
        own = await self.registry.promoted(story.community)
        return (own.name, str(own.path)) if own is not None else None

    async def scorer_for(self, story: Story) -> Scorer | None:
        """The reward model that ranks a story's best-of-n candidates (its community's
        own, else the shared one), or None when none is promoted."""
        if self.rewards is None:
            return None
        return await self.rewards.scorer(story.community)
