"""Reactions, written in batches.

Reactions come in bursts: a popular message, a raid, a bot's own test. Written one
transaction each (two reads and a write), 5,000 of them queue every command behind them
on the one database connection for seconds. The recorder queues events and writes them
in arrival order, a batch per transaction; a command's queries wait for one batch at
most. Each caller still learns whether its event counted, once it is committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

from ..storage import FeedbackRecords, ReactionEvent

log = logging.getLogger(__name__)


class ReactionRecorder:
    def __init__(self, store: FeedbackRecords, *, max_batch: int = 500) -> None:
        self.store = store
        self.max_batch = max_batch
        self._pending: list[tuple[ReactionEvent, asyncio.Future[bool]]] = []
        self._wake = asyncio.Event()
        self._idle = asyncio.Event()
        self._idle.set()
        self._task: asyncio.Task[None] | None = None
        self.batches = 0
        """Transactions written so far (the tests and the soak bench read it)."""
        self.recorded = 0
        """Events written that counted (on a story message, by someone not forgotten)."""

    async def record(self, event: ReactionEvent) -> bool:
        """Queue one event; returns once it is committed: True if it counted."""
        future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self._pending.append((event, future))
        self._idle.clear()
        self._wake.set()
        if self._task is None or self._task.done():
            self._task = asyncio.create_task(self._run(), name="reaction-recorder")
        return await asyncio.shield(future)

    async def _run(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            while self._pending:
                batch = self._pending[: self.max_batch]
                del self._pending[: self.max_batch]
                try:
                    counted = await self.store.apply_reactions([e for e, _ in batch])
                except Exception as exc:
                    log.exception("recording %d reactions failed", len(batch))
                    for _, future in batch:
                        if not future.done():
                            future.set_exception(exc)
                else:
                    self.batches += 1
                    self.recorded += sum(counted)
                    for (_, future), ok in zip(batch, counted, strict=True):
                        if not future.done():
                            future.set_result(ok)
                await asyncio.sleep(0)  # let commands reach the database between batches
            self._idle.set()

    async def flush(self) -> None:
        """Wait until every queued event is written."""
        if self._task is not None and not self._task.done():
            await self._idle.wait()

    async def close(self) -> None:
        await self.flush()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
