"""How the audience's feedback goes: approval per adapter version and reactions per day,
as text (for screen readers and terminals) and as a PNG chart (matplotlib, Agg).

`/storyadmin stats` attaches the chart and keeps the text; `storyengine feedback stats
[--png FILE]` prints the text and writes the chart. The chart answers the question a
table hid: is approval rising from one adapter version to the next, and on how many
votes does each figure rest.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from ..storage import FeedbackRecords

DAYS = 30
"""The reactions-per-day panel covers this many days, today included."""


@dataclass(frozen=True)
class DayCount:
    day: date
    liked: int
    disliked: int
    neutral: int

    @property
    def total(self) -> int:
        return self.liked + self.disliked + self.neutral


@dataclass(frozen=True)
class FeedbackSummary:
    versions: list[dict[str, Any]]
    """`FeedbackRecords.feedback_stats` rows: adapter, generations, reacted, liked,
    disliked, approval."""
    days: list[DayCount]
    """One per day, oldest first, `DAYS` of them ending today (UTC)."""


async def reactions_per_day(
    store: FeedbackRecords, community: str | None, *, days: int = DAYS, today: date | None = None
) -> list[DayCount]:
    """Votes per day (a user's emoji counted once per continuation, as everywhere),
    split by what they count as; days without votes are zeros."""
    today = today or datetime.now(UTC).date()
    first = today - timedelta(days=days - 1)
    found = await store.votes_per_day(first.isoformat(), community or None)
    out = []
    for i in range(days):
        day = first + timedelta(days=i)
        out.append(DayCount(day, *found.get(day.isoformat(), (0, 0, 0))))
    return out


async def feedback_summary(
    store: FeedbackRecords, community: str | None = None, *, today: date | None = None
) -> FeedbackSummary:
    return FeedbackSummary(
        await store.feedback_stats(community),
        await reactions_per_day(store, community, today=today),
    )


def version_name(adapter: str | None) -> str:
    return adapter or "base model"


def summary_lines(summary: FeedbackSummary, *, last: int | None = None) -> list[str]:
    """The figures in sentences: what the chart shows, for someone who cannot see it
    (the newest `last` versions only, when given)."""
    versions = summary.versions[-last:] if last else summary.versions
    lines = []
    if len(versions) < len(summary.versions):
        lines.append(f"{len(summary.versions) - len(versions)} older versions: see the chart")
    for r in versions:
        votes = r["liked"] + r["disliked"]
        approval = (
            f"approval {r['approval']:.0%} ({r['liked']} liked, {r['disliked']} disliked)"
            if votes
            else "no votes yet"
        )
        lines.append(
            f"{version_name(r['adapter'])}: {approval}; {r['generations']} continuations"
            f" shown, {r['reacted']} with reactions"
        )
    week = sum(d.total for d in summary.days[-7:])
    month = sum(d.total for d in summary.days)
    busiest = max(summary.days, key=lambda d: d.total)
    lines.append(
        f"Reactions: {week} in the last 7 days, {month} in the last {len(summary.days)}"
        + (f" (busiest day {busiest.day.isoformat()}: {busiest.total})" if busiest.total else "")
    )
    return lines


def render_chart(summary: FeedbackSummary, *, title: str = "Taleweaver feedback") -> bytes:
    """A PNG, 1000 x 700 pixels: approval per adapter version, each bar labelled with
    the votes behind it, above reactions per day. Blocking (about a second): run it in
    a thread. Uses matplotlib's object API, not pyplot, so it is safe in any thread."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(10, 7), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    top, bottom = figure.subplots(2, 1, height_ratios=[1, 1])
    figure.suptitle(title)

    names = [version_name(r["adapter"]) for r in summary.versions]
    approvals = [100 * (r["approval"] or 0) for r in summary.versions]
    bars = top.bar(range(len(names)), approvals, color="#4c78a8")
    for bar, r in zip(bars, summary.versions, strict=True):
        votes = r["liked"] + r["disliked"]
        label = f"{r['approval']:.0%}\n{votes} votes" if votes else "no votes"
        top.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            xytext=(0, 3),
            textcoords="offset points",
            ha="center",
            va="bottom",
            fontsize=9,
        )
    top.set_xticks(range(len(names)), names, rotation=30 if len(names) > 8 else 0)
    top.set_ylim(0, 119)
    top.set_yticks([0, 25, 50, 75, 100])
    top.set_ylabel("approval, %")
    top.set_title("Approval per adapter version (liked / (liked + disliked))", fontsize=11)
    if not names:
        top.text(0.5, 0.5, "no continuations yet", ha="center", transform=top.transAxes)

    days = [d.day for d in summary.days]
    liked = [d.liked for d in summary.days]
    disliked = [d.disliked for d in summary.days]
    neutral = [d.neutral for d in summary.days]
    bottom.bar(days, liked, color="#59a14f", label="liked")
    bottom.bar(days, disliked, bottom=liked, color="#e15759", label="disliked")
    stacked = [a + b for a, b in zip(liked, disliked, strict=True)]
    bottom.bar(days, neutral, bottom=stacked, color="#bab0ac", label="other")
    bottom.set_title(f"Reactions per day, last {len(days)} days", fontsize=11)
    bottom.set_ylabel("reactions")
    bottom.legend(loc="upper left", fontsize=9)
    bottom.tick_params(axis="x", labelsize=8, labelrotation=30)

    out = io.BytesIO()
    figure.savefig(out, format="png")
    return out.getvalue()


def png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from a PNG's header."""
    if data[:8] != b"\x89PNG\r\n\x1a\n" or data[12:16] != b"IHDR":
        raise ValueError("not a PNG")
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
