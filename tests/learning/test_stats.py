"""The feedback chart: approval per adapter version with the votes behind it, and
reactions per day, from a real database; `storyengine feedback stats --png`."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from storyengine.cli.main import main as cli_main
from storyengine.learning.stats import DAYS, feedback_summary, png_size, render_chart, summary_lines
from storyengine.storage.store import ReactionEvent, Store


async def generation(store: Store, story_id: int, adapter: str | None) -> int:
    return await store.record_generation(
        story_id=story_id,
        channel="c",
        prompt="Once upon a time",
        output="there was a fox.",
        raw_output="there was a fox.",
        params={},
        model_id="m",
        adapter_id=adapter,
        prompt_tokens=5,
        output_tokens=5,
        finish_reason="eos",
        latency_s=0.1,
        ttft_s=0.01,
    )


async def feedback_db(path) -> None:
    """Base model: 1 liked, 3 disliked; v0001: 3 liked, 1 disliked; v0002: shown, no
    votes. Two of the votes are dated 10 days ago, one 40 days ago (outside the chart)."""
    store = await Store(path).open()
    story = await store.create_story(
        "c", "Once upon a time.", genre=None, mode="solo", created_by="1", community="g1"
    )
    votes = {None: [1, -1, -1, -1], "v0001": [1, 1, 1, -1], "v0002": []}
    events = []
    for adapter, values in votes.items():
        gen = await generation(store, story.id, adapter)
        await store.link_message(f"m-{adapter}", gen)
        for user, value in enumerate(values):
            emoji = "👍" if value > 0 else "👎"
            events.append(ReactionEvent(f"m-{adapter}", f"u{user}", emoji, True, value))
    events.append(ReactionEvent("m-v0001", "u9", "🎉", True, 0.0))
    assert all(await store.apply_reactions(events))
    now = datetime.now(UTC)
    for user, days in (("u0", 10), ("u1", 10), ("u2", 40)):
        stamp = (now - timedelta(days=days)).strftime("%Y-%m-%dT%H:%M:%S.000Z")
        await store._write(
            "UPDATE feedback SET created_at = ? WHERE user_id = ? AND message_id = 'm-v0001'",
            (stamp, user),
        )
    await store.close()


async def test_the_summary_and_the_chart_from_a_database_with_feedback(tmp_path):
    await feedback_db(tmp_path / "s.db")
    store = await Store(tmp_path / "s.db").open()
    summary = await feedback_summary(store)
    other = await feedback_summary(store, "another-server")
    await store.close()

    approvals = {r["adapter"]: r["approval"] for r in summary.versions}
    assert approvals == {None: 0.25, "v0001": 0.75, "v0002": None}
    assert len(summary.days) == DAYS and summary.days[-1].day == datetime.now(UTC).date()
    assert sum(d.total for d in summary.days) == 8  # 9 votes, one 40 days old
    assert summary.days[-11].liked == 2  # ten days ago
    assert sum(d.neutral for d in summary.days) == 1
    assert other.versions == [] and sum(d.total for d in other.days) == 0

    lines = summary_lines(summary)
    assert lines[:3] == [
        "base model: approval 25% (1 liked, 3 disliked); 1 continuations shown, 1 with reactions",
        "v0001: approval 75% (3 liked, 1 disliked); 1 continuations shown, 1 with reactions",
        "v0002: no votes yet; 1 continuations shown, 0 with reactions",
    ]
    assert lines[3].startswith("Reactions: 6 in the last 7 days, 8 in the last 30")

    png = render_chart(summary)
    assert png_size(png) == (1000, 700)
    assert 10_000 < len(png) < 500_000
    empty = render_chart(other)  # a server with nothing yet still gets a chart
    assert png_size(empty) == (1000, 700)


def test_feedback_stats_command_prints_the_figures_and_writes_the_chart(tmp_path, capsys):
    import asyncio

    asyncio.run(feedback_db(tmp_path / "s.db"))
    chart = tmp_path / "chart.png"
    assert cli_main(["feedback", "stats", "--db", str(tmp_path / "s.db"), "--png", str(chart)]) == 0
    out = capsys.readouterr()
    assert out.out.startswith("base model: approval 25% (1 liked, 3 disliked)")
    assert f"chart written to {chart}" in out.err
    assert png_size(chart.read_bytes()) == (1000, 700)
    assert cli_main(["feedback", "stats", "--db", str(tmp_path / "none.db")]) == 2
    assert "no database there" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
