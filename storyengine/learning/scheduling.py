"""When to train, and the training round as a child process.

A front end (the bot) owns one `TrainingScheduler`. Every so often it calls
`maybe_start()`: when at least `min_new_feedback` reactions and choices came in on
trainable stories since the last round started, and `interval_s` has passed since then,
it starts `storyengine train round` as a subprocess. An admin can `start()` one at any
time. At most one runs at a time: here, and across processes by the round's own lock
file (see `rounds.round_lock`).

The round runs in its own process so that training never shares the serving process's
event loop, threads or memory; it gets a lower CPU priority than serving. Its output is
kept in a log file under the adapter directory, and its last line is the progress shown
to admins. When a round promotes an adapter, the engine notices before its next
generation (`StoryEngine.sync_adapter`).

The round dies with the front end, even when that is killed outright (kill -9, a
crash): a round left behind could still promote an adapter nobody asked for any more,
and it would hold the round lock against the restarted bot. On Linux the kernel sends
the child SIGTERM when the thread that started it ends (PR_SET_PDEATHSIG; asyncio starts
children from the event loop's thread, which lives as long as the front end); and on
any system the child gets the front end's pid (`TALEWEAVER_PARENT_PID`) and its own watchdog
thread (`watch_parent`) ends it once its parent is gone. SIGTERM ends a round at once:
everything it writes is crash-safe (see `rounds`), so there is nothing to tidy first.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Literal, Protocol

from ..config import Settings
from ..errors import TrainingBusy
from ..progress import PROGRESS_VAR, ProgressUpdate
from ..storage import FeedbackRecords, TrainingRunRecords

log = logging.getLogger(__name__)

SECRET_MARKERS = ("TOKEN", "SECRET", "PASSWORD", "API_KEY")
"""Environment variables whose names hold one of these never reach the trainer."""
PARENT_PID_VAR = "TALEWEAVER_PARENT_PID"
"""The front end's pid, in the round's environment: the round ends when it is gone."""
PARENT_GONE_EXIT = 3
"""The exit status of a round that stopped because its front end was gone."""
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class TrainingSchedule:
    min_new_feedback: int = 50
    """Reactions and choices since the last round that make a new one worth it."""
    interval_s: float | None = 6 * 3600
    """Least time between two automatic rounds; None: no automatic rounds."""
    mode: Literal["local", "external"] = "local"
    """local: a round runs as this process's child; external: a round due is recorded
    in the database for `storyengine train worker` on another machine (`TRAIN_MODE`)."""


@dataclass
class TrainingJob:
    """One round's child process, as the front end sees it."""

    reason: str
    log_path: Path
    started_at: float
    process: asyncio.subprocess.Process | None = None
    last_line: str = "starting"
    finished_at: float | None = None
    returncode: int | None = None
    done: asyncio.Event = field(default_factory=asyncio.Event)
    community: str | None = None
    """The lineage it trains: a community's own, or None for the shared one."""
    progress: ProgressUpdate | None = None
    """The latest structured progress line of the child (its training steps), if any."""

    @property
    def running(self) -> bool:
        return not self.done.is_set()

    @property
    def outcome(self) -> str:
        """The round's verdict (promoted / rejected / skipped …), or why it failed."""
        if self.running:
            return f"running: {self.last_line}"
        if self.returncode == 0:
            return self.last_line
        return f"failed (exit code {self.returncode}): {self.last_line}"

    @property
    def kind(self) -> str:
        """running, promoted, rejected, skipped, registered, finished or failed: the
        outcome as one word (for metrics)."""
        if self.running:
            return "running"
        if self.returncode != 0:
            return "failed"
        word = self.last_line.split(" ", 1)[0].rstrip(":")
        kinds = ("promoted", "rejected", "skipped", "registered", "queued")
        return word if word in kinds else "finished"

    def read_line(self, raw: bytes) -> bool:
        """Take in one line of the child's output: a structured progress line updates
        `progress`, any other line worth showing becomes `last_line`. True if the line
        belongs in the round's log (progress lines do not: the child prints their
        plain form as well)."""
        line = raw.decode("utf-8", "replace").strip()
        update = ProgressUpdate.parse(line)
        if update is not None:
            self.progress = update
            return False
        if line and not line.startswith(("Warning", " ")) and "Warning:" not in line:
            self.last_line = line[:300]
        return True


def child_environment(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The parent's environment with secrets blanked (the bot's token has no business in
    a trainer's environment, or in a crash dump of it). Blanked, not removed: the child
    reads `.env` too, and an empty variable keeps `.env` from filling it in again."""
    environ = dict(os.environ if environ is None else environ)
    return {k: "" if any(m in k.upper() for m in SECRET_MARKERS) else v for k, v in environ.items()}


def die_with_parent() -> Callable[[], None] | None:
    """A `preexec_fn` that has Linux send the child SIGTERM when the thread that forks
    it ends (None elsewhere, or without prctl). libc's prctl is looked up here, in the
    parent: the child, between fork and exec, only calls it."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(PARENT_GONE_EXIT)

    return preexec


def watch_parent(interval_s: float = 1.0, environ: dict[str, str] | None = None) -> None:
    """In a round started by a front end (`TALEWEAVER_PARENT_PID` set): end this process,
    from a daemon thread, as soon as that front end is gone (this process's parent is
    then someone else). Already gone: end it now. Without the variable, nothing."""
    value = (os.environ if environ is None else environ).get(PARENT_PID_VAR, "")
    if not value.isdigit():
        return
    parent = int(value)
    if os.getppid() != parent:
        _parent_gone(parent)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval_s)
        _parent_gone(parent)

    threading.Thread(target=watch, name="parent-watchdog", daemon=True).start()


def _parent_gone(parent: int) -> None:
    """Say why, if anyone still reads, and exit at once (no cleanup: a round is crash-safe)."""
    with contextlib.suppress(OSError, ValueError):
        print(
            f"storyengine: the process that started this round (pid {parent}) is gone;"
            " stopping the round",
            file=sys.stderr,
            flush=True,
        )
    os._exit(PARENT_GONE_EXIT)


def parse_db_time(value: str) -> float:
    """A timestamp as the database writes it (UTC, ISO 8601) as a unix time."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).replace(tzinfo=UTC).timestamp()


class SchedulerRecords(TrainingRunRecords, FeedbackRecords, Protocol):
    """What deciding when a round is due reads: when the last one started, the new
    feedback since, the communities whose learning is on."""


class TrainingScheduler:
    def __init__(
        self,
        settings: Settings,
        store: SchedulerRecords,
        schedule: TrainingSchedule,
        *,
        command: Sequence[str] | None = None,
        clock: Callable[[], float] = time.time,
        nice: int = 10,
    ) -> None:
        self.settings = settings
        self.store = store
        self.schedule = schedule
        self.command = list(command) if command is not None else self.default_command()
        self.clock = clock
        self.nice = nice
        self.checks = 0
        """How many times `maybe_start` has looked for a due round."""
        self.job: TrainingJob | None = None
        """The running round, or the last one this process started."""
        self.outcomes: dict[str, int] = {}
        """Rounds this process ran, by `TrainingJob.kind` (for metrics)."""
        self._watch: asyncio.Task[None] | None = None

    def default_command(self) -> list[str]:
        """`storyengine train round` on this front end's data. A PostgreSQL URL, which
        may hold a password, goes in the child's environment (`database_environment`),
        never on its command line, which every user of the machine can read."""
        database = [] if self.settings.db_url else ["--db", str(self.settings.db_path)]
        command = [sys.executable, "-m", "storyengine", "train", "round", *database]
        return [*command, "--dir", str(self.settings.adapter_dir)]

    def database_environment(self) -> dict[str, str]:
        """What tells the round where the data is, beside its command line."""
        return {"STORY_DB_URL": self.settings.db_url} if self.settings.db_url else {}

    @property
    def running(self) -> bool:
        return self.job is not None and self.job.running

    async def new_feedback(self, community: str | None = None) -> int:
        """Reactions and choices since a lineage's newest round (of any process): a
        community's own, or (None) the shared one's, on all learning communities."""
        last = await self.store.last_training_start(community)
        return await self.store.new_feedback_count(last, community)

    async def due(self, community: str | None = None) -> str | None:
        """Why an automatic round of a lineage (None: the shared one) should start
        now, or None."""
        if self.schedule.interval_s is None or self.running:
            return None
        last = await self.store.last_training_start(community)
        new = await self.store.new_feedback_count(last, community)
        if new < self.schedule.min_new_feedback:
            return None
        if last is not None and self.clock() - parse_db_time(last) < self.schedule.interval_s:
            return None
        where = f" in community {community}" if community is not None else ""
        return f"{new} new reactions and choices{where}"

    async def next_round(self) -> tuple[str, str | None] | None:
        """The lineage whose round is due with the most new feedback: the shared one
        or a learning community's own, as (reason, community); None if none is due."""
        due = []
        for community in [None, *await self.store.learning_communities()]:
            if (reason := await self.due(community)) is not None:
                due.append((await self.new_feedback(community), reason, community))
        if not due:
            return None
        _, reason, community = max(due, key=lambda d: d[0])
        return reason, community

    async def maybe_start(self) -> TrainingJob | None:
        """Start the round that is due, if one is (the bot's training clock calls this)."""
        found = await self.next_round()
        self.checks += 1
        return await self.start(found[0], community=found[1]) if found else None

    async def start(self, reason: str, *, community: str | None = None) -> TrainingJob:
        """Start a round now, of a community's own lineage or (None) the shared one
        (raises TrainingBusy if one is running)."""
        if self.running:
            raise TrainingBusy()
        if self.schedule.mode == "external":
            return await self._request(reason, community)
        logs = self.settings.round_log_dir
        await asyncio.to_thread(logs.mkdir, parents=True, exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
        job = TrainingJob(reason, logs / f"round-{stamp}.log", self.clock(), community=community)
        self.job = job
        try:
            job.process = await asyncio.create_subprocess_exec(
                *self.command,
                *(["--community", community] if community is not None else []),
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT,
                env={
                    **child_environment(),
                    **self.database_environment(),
                    PARENT_PID_VAR: str(os.getpid()),
                    PROGRESS_VAR: "json",  # structured progress lines, parsed in _follow
                },
                preexec_fn=die_with_parent(),
            )
        except OSError as exc:
            job.last_line, job.returncode = f"could not start: {exc}", -1
            job.finished_at = self.clock()
            job.done.set()
            self._count(job)
            log.error("could not start a training round: %s", exc)
            return job
        with contextlib.suppress(OSError, AttributeError):  # serving comes first
            os.setpriority(os.PRIO_PROCESS, job.process.pid, self.nice)
        log.info("training round started (%s), log %s", reason, job.log_path)
        self._watch = asyncio.create_task(self._follow(job), name="training-round")
        return job

    async def _request(self, reason: str, community: str | None) -> TrainingJob:
        """TRAIN_MODE=external: the round is left in the database for a training
        worker (a lineage's waiting request is not doubled); the job says so."""
        request = await self.store.request_round(reason, community)
        job = TrainingJob(reason, Path(os.devnull), self.clock(), community=community)
        job.last_line = f"queued: round request #{request}, for a training worker"
        job.returncode, job.finished_at = 0, self.clock()
        job.done.set()
        self.job = job
        self._count(job)
        log.info("training round due (%s): request #%d for a training worker", reason, request)
        return job

    async def _follow(self, job: TrainingJob) -> None:
        assert job.process is not None and job.process.stdout is not None
        with job.log_path.open("ab") as log_file:
            async for raw in job.process.stdout:
                if job.read_line(raw):
                    log_file.write(raw)
                    log_file.flush()
        job.returncode = await job.process.wait()
        job.finished_at = self.clock()
        job.done.set()
        self._count(job)
        log.info("training round finished: %s", job.outcome)

    def _count(self, job: TrainingJob) -> None:
        self.outcomes[job.kind] = self.outcomes.get(job.kind, 0) + 1

    async def wait(self) -> TrainingJob | None:
        if self.job is not None:
            await self.job.done.wait()
        return self.job

    async def close(self, grace_s: float = 3.0) -> None:
        """Stop a running round (it leaves the served adapter and the database intact):
        SIGTERM, which ends a round at once, then SIGKILL after `grace_s`, so a front
        end's shutdown stays short."""
        job = self.job
        if job is None or not job.running or job.process is None:
            return
        with contextlib.suppress(ProcessLookupError):
            job.process.terminate()
        try:
            await asyncio.wait_for(job.done.wait(), grace_s)
        except TimeoutError:
            with contextlib.suppress(ProcessLookupError):
                job.process.kill()
            await job.done.wait()
