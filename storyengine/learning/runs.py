"""The skeleton every training run shares (`train round`, `train sft`): one run at a time
(the round lock), what a killed run left behind swept, a `training_runs` row that ends
as finished, skipped or failed whatever happens in between.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

from ..config import Settings
from ..storage import StoryStore
from ..storage.store import Store
from .registry import AdapterRegistry, round_lock


@dataclass
class TrainingRun:
    store: StoryStore
    registry: AdapterRegistry
    id: int | None = None
    version: int | None = None
    """The adapter version the run registered, once it has."""
    error: str | None = None
    """Why the run ended without a promotion (a skip's or the gate's reason)."""
    data_until: int | None = None
    """The newest generation the run's data reached (its data window's end)."""

    async def begin(self, method: str, community: str | None = None) -> None:
        """Record the run (its method known once the data is read)."""
        self.id = await self.store.start_training_run(method, community)

    async def registered(self, version: int, method: str | None = None) -> None:
        """A version was written: record it at once, not when the run finishes, so that
        a crash after a promotion cannot lose which data that adapter learned from.
        `method`: the one it trained, where that is not the one the run began with (a
        round that sampled pairs of its own trains DPO where it planned KTO)."""
        self.version = version
        if self.id is not None:
            await self.store.set_training_run_version(self.id, version, self.data_until, method)

    def end(self, *, version: int | None = None, error: str | None = None) -> None:
        """How the run ends, written when the body returns."""
        self.version = version if version is not None else self.version
        self.error = error


@asynccontextmanager
async def training_run(settings: Settings) -> AsyncIterator[TrainingRun]:
    """Hold the round lock, open the database and the registry (sweeping a killed run's
    leftovers; runs still marked running are marked interrupted), and yield the run.
    Whatever escapes the body (an error, a cancellation, Ctrl-C) marks the run failed
    with it; otherwise it is finished as `end` said."""
    with round_lock(settings.adapter_dir):
        store = await Store(settings.database).open()
        try:
            # The database's round lock too: a shared database has several machines.
            async with store.round_lock(), _run(store, settings) as run:
                yield run
        finally:
            await store.close()


@asynccontextmanager
async def _run(store: StoryStore, settings: Settings) -> AsyncIterator[TrainingRun]:
    # We hold the round lock: leftovers are a killed run's, and so are runs still
    # 'running'.
    registry = await AdapterRegistry(store, settings.adapter_dir).open(locked=True)
    await store.interrupt_training_runs()
    run = TrainingRun(store, registry)
    try:
        yield run
    except BaseException as exc:
        if run.id is not None:
            await store.fail_training_run(run.id, exc)
        raise
    if run.id is not None:
        await store.finish_training_run(
            run.id, version=run.version, error=run.error, data_until=run.data_until
        )
