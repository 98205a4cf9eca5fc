"""The adapter registry: versioned LoRA adapters on disk, their status in SQLite.

Each version is a directory `v0001/`, `v0002/`, ... under the registry's root, in peft's
`save_pretrained` format (safetensors) with a `taleweaver.json` beside it (method,
parent, metrics, data counts). A version is written into a hidden temporary directory
and renamed into place, so a crash never leaves a half-written adapter where the
registry looks. At most one version is *promoted*: the one the storyteller serves.
Promoting retires the previous one (one transaction); rollback brings back the last
retired one (or the bare base model).

Crash safety: the files come first, the row second, promotion last, so a crash at any
step leaves one of: a temporary directory (deleted on the next open), a version
directory without a row (moved aside to `orphaned/` on the next open), a candidate
(kept: an admin may still promote it), or a promotion that is whole or not at all. The
sweep runs holding the round lock, so it never touches the files of a running round;
and a new version takes a number past every row *and* every directory, so nothing a
crash left behind can stand in its way.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import shutil
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from ..errors import InvalidInput, TrainingBusy
from ..storage import AdapterRecords

log = logging.getLogger(__name__)

AdapterStatus = Literal["candidate", "promoted", "rejected", "retired"]

VERSION_DIR = re.compile(r"v(\d{4,})")
"""A version's directory name: v0001, v0002, ..."""
ORPHANS = "orphaned"
"""Where the sweep moves version directories that have no registry row."""


@dataclass(frozen=True)
class AdapterVersion:
    version: int
    path: Path
    status: AdapterStatus
    parent_version: int | None
    method: str
    metrics: dict[str, Any]
    data_counts: dict[str, Any]
    created_at: str
    promoted_at: str | None
    community: str | None = None
    """The lineage: a community's own, or None for the shared one."""

    @property
    def name(self) -> str:
        """The adapter's name when loaded for serving."""
        return f"v{self.version}"

    def summary(self) -> str:
        """One line: version, status, method, date and the gate's main figures."""
        m = self.metrics
        parts = [f"v{self.version}", self.status, self.method, self.created_at[:16]]
        if "preference_accuracy" in m:
            parts.append(
                f"accuracy {m['preference_accuracy']:.2f}"
                f" (was {m['current_preference_accuracy']:.2f})"
            )
        if "perplexity" in m:
            parts.append(f"ppl {m['perplexity']:.2f} (base {m['base_perplexity']:.2f})")
        if m.get("distinct2") is not None:
            parts.append(f"distinct-2 {m['distinct2']:.2f}")
        if "corpus_ppl" in m:
            parts.append(f"corpus ppl {m['corpus_ppl_before']:.2f} → {m['corpus_ppl']:.2f}")
            parts.append(f"stories ppl {m['stories_ppl']:.2f} (base {m['base_stories_ppl']:.2f})")
        if m.get("reasons"):
            parts.append("gate: " + "; ".join(m["reasons"]))
        return " · ".join(parts)


@contextmanager
def round_lock(adapter_dir: Path) -> Iterator[None]:
    """Hold the adapter directory's round lock: one round at a time, whichever process
    starts it. The operating system drops the lock when its holder dies."""
    try:
        import fcntl
    except ImportError:  # not POSIX: no cross-process lock
        yield
        return
    adapter_dir.mkdir(parents=True, exist_ok=True)
    with (adapter_dir / ".round.lock").open("a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise TrainingBusy() from None
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


class AdapterRegistry:
    def __init__(self, store: AdapterRecords, root: Path) -> None:
        self.store = store
        self.root = Path(root)

    async def open(self, *, locked: bool = False) -> AdapterRegistry:
        """Open the registry, sweeping what a killed writer left behind. `locked`: the
        caller holds the round lock (a round does); otherwise the sweep takes it, and is
        skipped while a round runs (its files are not leftovers)."""
        if locked:
            await self._sweep()
        elif self.root.is_dir():
            try:
                with round_lock(self.root):
                    await self._sweep()
            except TrainingBusy:
                pass
        return self

    async def _sweep(self) -> None:
        """Delete temporary directories and move aside version directories without a
        row (call it holding the round lock)."""
        if not self.root.is_dir():
            return
        known = await self.store.adapter_versions()
        moved = await asyncio.to_thread(sweep_directory, self.root, known)
        for path in moved:
            log.warning(
                "adapter directory %s has no registry row (left by a killed round, or the"
                " database is not the one it was written with): moved it to %s",
                path.name,
                path,
            )

    async def register(
        self,
        save: Callable[[Path], None],
        *,
        method: str,
        parent_version: int | None = None,
        metrics: dict[str, Any] | None = None,
        data_counts: dict[str, Any] | None = None,
        community: str | None = None,
        recipe: dict[str, Any] | None = None,
    ) -> AdapterVersion:
        """Write a new candidate version: `save(directory)` writes the adapter files
        (peft's `save_pretrained`), in a worker thread. `community`: the lineage it
        belongs to (None: the shared one). `recipe`: what reproduces it (the method's
        configuration, seed, base model, data window, gate settings), kept in the
        version's `taleweaver.json` as a nanoGPT checkpoint keeps its config."""
        newest = await self.store.newest_adapter_version()
        # Past every directory too: one a crash left without a row must not block us.
        version = max(newest, await asyncio.to_thread(newest_on_disk, self.root)) + 1
        final = self.root / f"v{version:04d}"
        meta = {
            "version": version,
            "community": community,
            "method": method,
            "parent_version": parent_version,
            "metrics": metrics or {},
            "data_counts": data_counts or {},
            "recipe": json.loads(json.dumps(recipe or {}, default=str)),
        }

        def write() -> None:
            tmp = self.root / f".tmp-v{version:04d}-{uuid.uuid4().hex}"
            tmp.mkdir(parents=True)  # the root too, the first time
            try:
                save(tmp)
                if not (tmp / "adapter_config.json").is_file():
                    raise RuntimeError("the adapter was not saved in peft's format")
                (tmp / "taleweaver.json").write_text(json.dumps(meta, indent=2), encoding="utf-8")
                os.replace(tmp, final)  # atomic on one filesystem
            except BaseException:
                shutil.rmtree(tmp, ignore_errors=True)
                raise

        await asyncio.to_thread(write)
        await self.store.add_adapter(
            version,
            str(final),
            parent_version=parent_version,
            method=method,
            metrics=meta["metrics"],
            data_counts=meta["data_counts"],
            community=community,
        )
        found = await self.get(version)
        assert found is not None
        return found

    async def get(self, version: int) -> AdapterVersion | None:
        row = await self.store.adapter(version)
        return _version(row) if row else None

    async def list(self) -> list[AdapterVersion]:
        """Every version, of every lineage."""
        return [_version(r) for r in await self.store.adapters()]

    async def lineage(self, community: str | None) -> list[AdapterVersion]:
        """One lineage's versions: a community's own, or (None) the shared ones."""
        return [_version(r) for r in await self.store.adapters(community, every=False)]

    async def promoted(self, community: str | None = None) -> AdapterVersion | None:
        """The version a lineage serves (None: the shared lineage's)."""
        row = await self.store.promoted_adapter(community)
        return _version(row) if row else None

    async def serving(self, community: str | None) -> AdapterVersion | None:
        """What a community's stories are served: its own promoted version, else the
        shared one (None: the base model, or STORY_ADAPTER)."""
        own = await self.promoted(community) if community is not None else None
        return own or await self.promoted(None)

    async def set_metrics(self, version: int, metrics: dict[str, Any]) -> None:
        await self.store.set_adapter_metrics(version, metrics)

    async def promote(self, version: int) -> AdapterVersion:
        """Serve `version` from now on; the version served before is retired."""
        target = await self.get(version)
        if target is None:
            raise InvalidInput(f"There is no adapter version {version}.")
        if not (target.path / "adapter_config.json").is_file():
            raise InvalidInput(f"Adapter version {version} is missing on disk ({target.path}).")
        await self.store.promote_adapter(version, target.community)
        promoted = await self.get(version)
        assert promoted is not None
        return promoted

    async def reject(self, version: int) -> None:
        await self.store.reject_adapter(version)

    async def rollback(self, community: str | None = None) -> AdapterVersion | None:
        """Retire a lineage's promoted version and serve the one it promoted before (the
        most recently promoted retired one), or none: for a community, the shared
        adapter again; for the shared lineage, the bare base model."""
        current = await self.promoted(community)
        if current is None:
            raise InvalidInput(
                "No adapter of this server's own is promoted: it is served the shared one."
                if community is not None
                else "No adapter is promoted: the base model is already being served."
            )
        await self.store.roll_back_adapter(current.version, community)
        return await self.promoted(community)


def newest_on_disk(root: Path) -> int:
    """The highest version number among `root`'s version directories (0: none)."""
    if not root.is_dir():
        return 0
    found = (VERSION_DIR.fullmatch(p.name) for p in root.iterdir())
    return max((int(m.group(1)) for m in found if m), default=0)


def sweep_directory(root: Path, known: set[int]) -> list[Path]:
    """Delete `root`'s temporary directories (half-written versions) and move each
    version directory whose number is not in `known` to `root/orphaned/`. Returns where
    those went.

    Moved, not deleted: such a directory is usually a whole adapter whose row a crash
    kept from being written, but it may also be one of many whose rows are missing
    because the database was replaced (restored from an older backup, pointed at the
    wrong file). Deleting would then destroy trained adapters; moving them keeps them,
    out of the registry's way, for a person to look at."""
    for leftover in root.glob(".tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    moved = []
    for path in sorted(root.iterdir()):
        match = VERSION_DIR.fullmatch(path.name)
        if match is None or int(match.group(1)) in known or not path.is_dir():
            continue
        target = root / ORPHANS / f"{path.name}-{uuid.uuid4().hex[:8]}"
        target.parent.mkdir(exist_ok=True)
        os.replace(path, target)
        moved.append(target)
    return moved


def _version(row: Any) -> AdapterVersion:
    return AdapterVersion(
        version=row["version"],
        path=Path(row["path"]),
        status=row["status"],
        parent_version=row["parent_version"],
        method=row["method"],
        metrics=json.loads(row["metrics"]),
        data_counts=json.loads(row["data_counts"]),
        created_at=row["created_at"],
        promoted_at=row["promoted_at"],
        community=row["community"],
    )
