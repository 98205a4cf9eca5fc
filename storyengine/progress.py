"""Progress of long work (training, benchmarks), shown where someone can see it.

Three audiences, three forms:

- a person at a terminal: a tqdm bar with the rate and the time left, on stderr;
- a log (a pipe, a file, a service's journal): a plain line now and then, the first
  step, then at most one every `LINE_EVERY_S` seconds, and the last, so a short run is
  never silent and a long one never floods the log;
- a front end running the work as a child process (the bot's training rounds): the
  plain lines, and a structured line on stdout for each update (at most one a second),
  `PREFIX` followed by a JSON object (`ProgressUpdate`), that the front end parses
  into a live progress bar of its own.

`STORY_PROGRESS` (`bar`, `lines`, `json`, `off`) chooses; by default, `bar` on a terminal
and `lines` elsewhere. The bot sets `json` for its training rounds.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any, Literal, TextIO

Mode = Literal["bar", "lines", "json", "off"]

PROGRESS_VAR = "STORY_PROGRESS"
PREFIX = "@progress "
"""Starts every structured progress line; what follows is one JSON object."""
LINE_EVERY_S = 10.0
"""Plain lines: at most one per this many seconds between the first and the last."""
JSON_EVERY_S = 1.0
"""Structured lines: at most one per this many seconds between the first and the last."""


@dataclass(frozen=True)
class ProgressUpdate:
    """Where a piece of work stands; what a structured progress line carries."""

    task: str
    """What is being done: "training", "baseline", ..."""
    step: int
    total: int | None
    elapsed_s: float
    eta_s: float | None = None
    """Seconds left at the pace so far; None before the first step or without a total."""
    detail: str = ""
    """A short figure worth seeing, such as the latest training loss."""

    def to_line(self) -> str:
        return PREFIX + json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def parse(cls, line: str) -> ProgressUpdate | None:
        """The update a line carries, or None if it is not a well-formed progress line."""
        if not line.startswith(PREFIX):
            return None
        try:
            data = json.loads(line[len(PREFIX) :])
            total = data.get("total")
            eta = data.get("eta_s")
            return cls(
                task=str(data["task"]),
                step=int(data["step"]),
                total=None if total is None else int(total),
                elapsed_s=float(data["elapsed_s"]),
                eta_s=None if eta is None else float(eta),
                detail=str(data.get("detail") or ""),
            )
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    @property
    def fraction(self) -> float | None:
        if not self.total:
            return None
        return min(max(self.step / self.total, 0.0), 1.0)

    def describe(self) -> str:
        """`step 3/12 (25%) · loss 0.6931 · 0:04 elapsed · about 0:12 left`"""
        of = f"/{self.total}" if self.total else ""
        parts = [f"step {self.step}{of}" + (f" ({self.fraction:.0%})" if self.total else "")]
        if self.detail:
            parts.append(self.detail)
        parts.append(f"{clock(self.elapsed_s)} elapsed")
        if self.eta_s is not None and self.step != self.total:
            parts.append(f"about {clock(self.eta_s)} left")
        return " · ".join(parts)


def clock(seconds: float) -> str:
    """0:04, 12:30, 1:02:03."""
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def text_bar(fraction: float, width: int = 20) -> str:
    """A bar of block characters, for places without a terminal (a Discord message)."""
    filled = round(min(max(fraction, 0.0), 1.0) * width)
    return "█" * filled + "░" * (width - filled)


def resolve_mode(stream: TextIO | None = None, environ: dict[str, str] | None = None) -> Mode:
    """`STORY_PROGRESS` if set to a known mode, else a bar on a terminal, lines elsewhere."""
    wanted = (environ if environ is not None else os.environ).get(PROGRESS_VAR, "").strip()
    if wanted in ("bar", "lines", "json", "off"):
        return wanted  # type: ignore[return-value]
    target: TextIO = stream if stream is not None else sys.stderr
    try:
        return "bar" if target.isatty() else "lines"
    except (AttributeError, ValueError):  # a closed or odd stream
        return "lines"


def echo(line: str, file: TextIO | None = None) -> None:
    """Print a line without tearing a progress bar that is being drawn (tqdm's write
    clears active bars and draws them again below the line)."""
    out: TextIO = file if file is not None else sys.stdout
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover - tqdm comes with transformers
        print(line, file=out, flush=True)
        return
    tqdm.write(line, file=out)
    out.flush()


class Progress:
    """Reports steps of one piece of work in the form `mode` asks for.

    `update(step)` after each step (or `advance()`), `close()` at the end (or use it
    as a context manager). `say` receives the plain lines (default: printed to
    stderr); structured lines go to `out` (default: stdout)."""

    def __init__(
        self,
        task: str,
        total: int | None,
        *,
        mode: Mode | None = None,
        say: Callable[[str], None] | None = None,
        out: TextIO | None = None,
        unit: str = "step",
        clock_fn: Callable[[], float] = time.monotonic,
        line_every_s: float = LINE_EVERY_S,
        json_every_s: float = JSON_EVERY_S,
    ) -> None:
        self.task = task
        self.total = total if total and total > 0 else None
        self.mode: Mode = mode or resolve_mode()
        self.say = say or (lambda line: print(line, file=sys.stderr, flush=True))
        self.out = out
        self.clock = clock_fn
        self.line_every_s = line_every_s
        self.json_every_s = json_every_s
        self.started = clock_fn()
        self.step = 0
        self.detail = ""
        self._said_at: float | None = None
        self._said_step = 0
        self._sent_at: float | None = None
        self._sent_step = 0
        self._closed = False
        self._bar: Any = None
        if self.mode == "bar":
            from tqdm import tqdm

            self._bar = tqdm(
                total=self.total, desc=task, unit=unit, file=sys.stderr, dynamic_ncols=True
            )

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def snapshot(self) -> ProgressUpdate:
        elapsed = self.clock() - self.started
        eta = None
        if self.total and self.step > 0:
            eta = elapsed / self.step * max(self.total - self.step, 0)
        return ProgressUpdate(self.task, self.step, self.total, elapsed, eta, self.detail)

    def advance(self, n: int = 1, *, detail: str | None = None) -> None:
        self.update(self.step + n, detail=detail)

    def update(self, step: int, *, detail: str | None = None) -> None:
        """Step `step` is done (steps count from 1)."""
        if self._closed:
            return
        moved = step - self.step
        self.step = step
        if detail is not None:
            self.detail = detail
        if self._bar is not None:
            if detail is not None:
                self._bar.set_postfix_str(detail, refresh=False)
            self._bar.update(moved)
            return
        self._report(final=self.total is not None and step >= self.total)

    def note(self, detail: str, *, say_now: bool = False) -> None:
        """A new figure (a loss) for the current step: on the bar at once; in lines,
        with the next line, or now with `say_now`."""
        self.detail = detail
        if self._bar is not None:
            self._bar.set_postfix_str(detail)
        elif say_now and self.mode != "off" and self.step and not self._closed:
            self._said_at, self._said_step = self.clock(), self.step
            self.say(self.snapshot().describe())

    def close(self) -> None:
        """The end: the bar closes; the last step, if not yet reported, is."""
        if self._closed:
            return
        if self._bar is not None:
            self._bar.close()
        else:
            unsent = self.mode == "json" and self.step != self._sent_step
            if self.step != self._said_step or unsent:
                self._report(final=True)
        self._closed = True

    def _report(self, *, final: bool) -> None:
        if self.mode == "off":
            return
        now = self.clock()
        update = self.snapshot()
        if final or self._said_at is None or now - self._said_at >= self.line_every_s:
            if self.step != self._said_step:
                self._said_at, self._said_step = now, self.step
                self.say(update.describe())
        if self.mode == "json" and (
            final or self._sent_at is None or now - self._sent_at >= self.json_every_s
        ):
            if self.step != self._sent_step:
                self._sent_at, self._sent_step = now, self.step
                out = self.out if self.out is not None else sys.stdout
                print(update.to_line(), file=out, flush=True)
