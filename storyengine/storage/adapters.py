"""Adapter versions: the rows behind the registry (its files live on disk, see
`learning.registry`). A lineage is a community's own versions, or (NULL) the shared ones;
at most one version per lineage is promoted."""

from __future__ import annotations

import json
from typing import Any

from .database import SAME_LINEAGE, Repository, utc_now


class AdapterRepository(Repository):
    async def adapter_versions(self) -> set[int]:
        rows = await self.fetch("SELECT version FROM adapters")
        return {int(r[0]) for r in rows}

    async def newest_adapter_version(self) -> int:
        rows = await self.fetch("SELECT MAX(version) FROM adapters")
        return int(rows[0][0] or 0)

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
        await self._write(
            "INSERT INTO adapters (version, path, parent_version, method, metrics, data_counts,"
            " community) VALUES (?, ?, ?, ?, ?, ?, ?)",
            (
                version,
                path,
                parent_version,
                method,
                json.dumps(metrics),
                json.dumps(data_counts),
                community,
            ),
        )

    async def adapter(self, version: int) -> dict[str, Any] | None:
        rows = await self.fetch("SELECT * FROM adapters WHERE version = ?", (version,))
        return dict(rows[0]) if rows else None

    async def adapters(
        self, community: str | None = None, *, every: bool = True
    ) -> list[dict[str, Any]]:
        """Every version (`every`), or one lineage's, oldest first."""
        if every:
            rows = await self.fetch("SELECT * FROM adapters ORDER BY version")
        else:
            rows = await self.fetch(
                f"SELECT * FROM adapters WHERE {SAME_LINEAGE} ORDER BY version", (community,)
            )
        return [dict(r) for r in rows]

    async def promoted_adapter(self, community: str | None) -> dict[str, Any] | None:
        rows = await self.fetch(
            f"SELECT * FROM adapters WHERE status = 'promoted' AND {SAME_LINEAGE}", (community,)
        )
        return dict(rows[0]) if rows else None

    async def set_adapter_metrics(self, version: int, metrics: dict[str, Any]) -> None:
        await self._write(
            "UPDATE adapters SET metrics = ? WHERE version = ?", (json.dumps(metrics), version)
        )

    async def promote_adapter(self, version: int, community: str | None) -> None:
        """`version` is served from now on; its lineage's promoted one is retired."""
        async with self.transaction() as db:
            await db.execute(
                f"UPDATE adapters SET status = 'retired' WHERE status = 'promoted'"
                f" AND {SAME_LINEAGE}",
                (community,),
            )
            await db.execute(
                "UPDATE adapters SET status = 'promoted', promoted_at = ? WHERE version = ?",
                (utc_now(), version),
            )

    async def reject_adapter(self, version: int) -> None:
        await self._write(
            "UPDATE adapters SET status = 'rejected' WHERE version = ? AND status = 'candidate'",
            (version,),
        )

    async def roll_back_adapter(self, current: int, community: str | None) -> None:
        """Reject the promoted `current` and promote again the lineage's most recently
        promoted retired version, if there is one."""
        rows = await self.fetch(
            "SELECT version FROM adapters WHERE status = 'retired' AND promoted_at IS NOT NULL"
            f" AND version != ? AND {SAME_LINEAGE} ORDER BY promoted_at DESC LIMIT 1",
            (current, community),
        )
        async with self.transaction() as db:
            await db.execute(
                "UPDATE adapters SET status = 'rejected' WHERE version = ?", (current,)
            )
            if rows:
                await db.execute(
                    "UPDATE adapters SET status = 'promoted' WHERE version = ?", (rows[0][0],)
                )

    async def data_window(self, community: str | None) -> tuple[int, int]:
        """A round's data window: (the newest generation the lineage's served versions
        were trained on, the newest generation now). Generation ids are the one
        watermark for "feedback since the last round"."""
        served = await self.fetch(
            "SELECT COALESCE(MAX(r.data_until), 0) FROM training_runs r"
            " JOIN adapters a ON a.version = r.version WHERE a.status IN ('promoted', 'retired')"
            f" AND {SAME_LINEAGE.replace('community', 'a.community')}",
            (community,),
        )
        newest = await self.fetch("SELECT COALESCE(MAX(id), 0) FROM generations")
        return int(served[0][0]), int(newest[0][0])
