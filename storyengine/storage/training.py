"""Training runs (what each round did) and reward model versions."""

from __future__ import annotations

import json
from typing import Any

from .database import SAME_LINEAGE, Repository, inserted_id, utc_now


class TrainingRepository(Repository):
    async def request_round(self, reason: str, community: str | None = None) -> int:
        """Note that a lineage's round is due (for a training worker); a request of the
        lineage still waiting is the one returned, not a second."""
        async with self.transaction() as db:
            cursor = await db.execute(
                f"SELECT id FROM training_requests WHERE taken_at IS NULL AND {SAME_LINEAGE}"
                " ORDER BY id LIMIT 1",
                (community,),
            )
            waiting = await cursor.fetchone()
            if waiting is not None:
                return int(waiting[0])
            return await inserted_id(
                db,
                "INSERT INTO training_requests (community, reason, requested_at) VALUES (?, ?, ?)",
                (community, reason, utc_now()),
            )

    async def take_round_request(
        self, worker: str, *, lease_s: float = 600.0
    ) -> tuple[int, str | None, str] | None:
        """The oldest waiting request, now taken by `worker`, as (id, community,
        reason); None if none waits. A request taken but neither finished nor renewed
        (`renew_round_request`) for `lease_s` seconds counts as waiting: its worker
        died. Writers are serialised, so two workers never take the same one."""
        stale = utc_now(-lease_s)
        async with self.transaction() as db:
            cursor = await db.execute(
                "SELECT id, community, reason FROM training_requests WHERE finished_at IS NULL"
                " AND (taken_at IS NULL OR taken_at < ?) ORDER BY id LIMIT 1",
                (stale,),
            )
            row = await cursor.fetchone()
            if row is None:
                return None
            await db.execute(
                "UPDATE training_requests SET taken_at = ?, taken_by = ? WHERE id = ?",
                (utc_now(), worker, row[0]),
            )
            return int(row[0]), row[1], row[2]

    async def renew_round_request(self, request_id: int, worker: str) -> bool:
        """`worker` still runs the request: its lease starts again. False if another
        worker has taken it since (this one was thought dead)."""
        async with self.transaction() as db:
            cursor = await db.execute(
                "UPDATE training_requests SET taken_at = ? WHERE id = ? AND taken_by = ?"
                " AND finished_at IS NULL",
                (utc_now(), request_id, worker),
            )
            return cursor.rowcount == 1

    async def finish_round_request(self, request_id: int, outcome: str) -> None:
        await self._write(
            "UPDATE training_requests SET finished_at = ?, outcome = ? WHERE id = ?",
            (utc_now(), outcome[:500], request_id),
        )

    async def round_requests(self) -> list[dict[str, Any]]:
        """Every request, newest first (what a worker took and how each ended)."""
        rows = await self.fetch("SELECT * FROM training_requests ORDER BY id DESC")
        return [dict(r) for r in rows]

    async def interrupt_training_runs(self) -> None:
        """Mark runs still 'running' as failed: call it holding the round lock, when
        any such run was killed."""
        await self._write(
            "UPDATE training_runs SET status = 'failed', error = 'interrupted',"
            " finished_at = ? WHERE status = 'running'",
            (utc_now(),),
        )

    async def start_training_run(self, method: str, community: str | None = None) -> int:
        """A run of `community`'s lineage (None: the shared one) starts."""
        return await self._insert(
            "INSERT INTO training_runs (method, community) VALUES (?, ?)", (method, community)
        )

    async def fail_training_run(self, run_id: int, exc: BaseException) -> None:
        """Record what stopped the run: its message, or its type when it has none."""
        await self._write(
            "UPDATE training_runs SET status = 'failed', error = ?, finished_at = ? WHERE id = ?",
            ((str(exc) or type(exc).__name__)[:500], utc_now(), run_id),
        )

    async def finish_training_run(
        self,
        run_id: int,
        *,
        version: int | None,
        error: str | None = None,
        data_until: int | None = None,
    ) -> None:
        await self._write(
            "UPDATE training_runs SET status = 'done', version = ?, error = ?, data_until = ?,"
            " finished_at = ? WHERE id = ?",
            (version, error, data_until, utc_now(), run_id),
        )

    async def set_training_run_version(
        self, run_id: int, version: int, data_until: int | None, method: str | None = None
    ) -> None:
        """Note on a running run the version it registered and the newest generation its
        data came from, as soon as the version exists: a run killed after that still
        keeps the next round from learning the same feedback again. `method`: the one it
        trained, when it is not the one the run began with."""
        await self._write(
            "UPDATE training_runs SET version = ?, data_until = ?, method = COALESCE(?, method)"
            " WHERE id = ?",
            (version, data_until, method, run_id),
        )

    async def last_training_start(self, community: str | None = None) -> str | None:
        """When the newest training run of a lineage started (a community's own, or
        None: the shared one), as the database writes times."""
        rows = await self.fetch(
            f"SELECT MAX(started_at) FROM training_runs WHERE {SAME_LINEAGE}",
            (community,),
        )
        return rows[0][0]

    async def add_reward_model(
        self,
        version: int,
        path: str,
        *,
        community: str | None,
        metrics: dict[str, Any],
        data_counts: dict[str, Any],
    ) -> None:
        await self._write(
            "INSERT INTO reward_models (version, community, path, metrics, data_counts)"
            " VALUES (?, ?, ?, ?, ?)",
            (version, community, path, json.dumps(metrics), json.dumps(data_counts)),
        )

    async def reward_model(self, version: int) -> dict[str, Any] | None:
        rows = await self.fetch("SELECT * FROM reward_models WHERE version = ?", (version,))
        return _reward_row(rows[0]) if rows else None

    async def reward_models(self) -> list[dict[str, Any]]:
        """Every reward model version, of every lineage, oldest first."""
        rows = await self.fetch("SELECT * FROM reward_models ORDER BY version")
        return [_reward_row(r) for r in rows]

    async def promoted_reward_model(self, community: str | None) -> dict[str, Any] | None:
        rows = await self.fetch(
            f"SELECT * FROM reward_models WHERE status = 'promoted' AND {SAME_LINEAGE}",
            (community,),
        )
        return _reward_row(rows[0]) if rows else None

    async def newest_reward_model_version(self) -> int:
        rows = await self.fetch("SELECT COALESCE(MAX(version), 0) FROM reward_models")
        return int(rows[0][0])

    async def promote_reward_model(self, version: int) -> None:
        """Promote `version` in its lineage; the one promoted there before is retired.
        One transaction."""
        async with self.transaction() as db:
            await db.execute(
                "UPDATE reward_models SET status = 'retired' WHERE status = 'promoted'"
                " AND COALESCE(community, '') ="
                " (SELECT COALESCE(community, '') FROM reward_models WHERE version = ?)",
                (version,),
            )
            await db.execute(
                "UPDATE reward_models SET status = 'promoted', promoted_at = ? WHERE version = ?",
                (utc_now(), version),
            )

    async def reject_reward_model(self, version: int) -> None:
        await self._write(
            "UPDATE reward_models SET status = 'rejected'"
            " WHERE version = ? AND status = 'candidate'",
            (version,),
        )

    async def rollback_reward_model(self, community: str | None) -> int | None:
        """Reject the lineage's promoted version and promote the one promoted before it
        (the most recently promoted retired one). Returns the version promoted now (None:
        none). One transaction; nothing changes when none is promoted."""
        async with self.transaction() as db:
            current = list(
                await db.execute_fetchall(
                    "SELECT version FROM reward_models WHERE status = 'promoted'"
                    f" AND {SAME_LINEAGE}",
                    (community,),
                )
            )
            if not current:
                return None
            await db.execute(
                "UPDATE reward_models SET status = 'rejected' WHERE version = ?",
                (current[0][0],),
            )
            before = list(
                await db.execute_fetchall(
                    "SELECT version FROM reward_models WHERE status = 'retired'"
                    f" AND promoted_at IS NOT NULL AND {SAME_LINEAGE}"
                    " ORDER BY promoted_at DESC LIMIT 1",
                    (community,),
                )
            )
            if before:
                await db.execute(
                    "UPDATE reward_models SET status = 'promoted' WHERE version = ?",
                    (before[0][0],),
                )
        return before[0][0] if before else None


def _reward_row(row: Any) -> dict[str, Any]:
    record = dict(row)
    record["metrics"] = json.loads(record["metrics"])
    record["data_counts"] = json.loads(record["data_counts"])
    return record
