"""Progress of long work: plain lines for logs, structured lines for the bot, and the
bot's side that reads a training round's structured lines from a real child process."""

from __future__ import annotations

import io
import sys
import textwrap

import pytest

from storyengine.config import Settings
from storyengine.learning.scheduling import TrainingSchedule, TrainingScheduler
from storyengine.progress import PREFIX, Progress, ProgressUpdate, clock, resolve_mode, text_bar
from storyengine.storage.store import Store


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_plain_lines_show_the_first_step_then_at_most_one_every_interval_and_the_last():
    """A short run is not silent (a 4-step run says its first and last step), a long
    one says something every 10 s with the time left, not at every step."""
    lines: list[str] = []
    t = Clock()
    progress = Progress("training", 4, mode="lines", say=lines.append, clock_fn=t)
    t.now += 3
    progress.update(1)
    assert lines == ["step 1/4 (25%) · 0:03 elapsed · about 0:09 left"]
    t.now += 3
    progress.update(2)  # 3 s after the last line: nothing
    progress.note("loss 0.6931", say_now=True)  # a logged loss is said at once
    t.now += 3
    progress.update(3)
    t.now += 3
    progress.update(4)
    progress.close()
    assert lines[1:] == [
        "step 2/4 (50%) · loss 0.6931 · 0:06 elapsed · about 0:06 left",
        "step 4/4 (100%) · loss 0.6931 · 0:12 elapsed",
    ]

    many: list[str] = []
    t = Clock()
    progress = Progress("training", 1000, mode="lines", say=many.append, clock_fn=t)
    for step in range(1, 1001):
        t.now += 0.5
        progress.update(step)
    progress.close()
    assert len(many) == 1 + 500 // 10 and many[-1].startswith("step 1000/1000 (100%)")


def test_a_run_stopped_early_still_reports_where_it_stopped():
    lines: list[str] = []
    t = Clock()
    progress = Progress("training", 12, mode="lines", say=lines.append, clock_fn=t)
    for step in (1, 2, 3):
        t.now += 1
        progress.update(step)
    progress.close()  # the drift guard stopped training at step 3
    assert [line.split(" ·")[0] for line in lines] == ["step 1/12 (8%)", "step 3/12 (25%)"]


def test_structured_lines_round_trip_and_are_throttled():
    out = io.StringIO()
    lines: list[str] = []
    t = Clock()
    progress = Progress("training", 3, mode="json", say=lines.append, out=out, clock_fn=t)
    for step in (1, 2, 3):
        t.now += 0.4
        progress.update(step)
    progress.close()
    sent = out.getvalue().splitlines()
    assert all(line.startswith(PREFIX) for line in sent)
    updates = [ProgressUpdate.parse(line) for line in sent]
    assert [u.step for u in updates] == [1, 3]  # step 2 came 0.4 s after step 1
    last = updates[-1]
    assert (last.task, last.total, last.fraction) == ("training", 3, 1.0)
    assert last.elapsed_s == pytest.approx(1.2) and last.eta_s == 0
    assert lines  # the plain lines come too (the round's log keeps them)
    for bad in ("step 3/12", PREFIX + "{", PREFIX + '{"task": "x"}', PREFIX + "[1]"):
        assert ProgressUpdate.parse(bad) is None


def test_modes_and_helpers():
    assert resolve_mode(io.StringIO(), {}) == "lines"
    assert resolve_mode(io.StringIO(), {"STORY_PROGRESS": "off"}) == "off"
    assert resolve_mode(io.StringIO(), {"STORY_PROGRESS": "loud"}) == "lines"
    assert (clock(4), clock(754), clock(3723)) == ("0:04", "12:34", "1:02:03")
    assert text_bar(0.5, 10) == "█████░░░░░" and text_bar(2.0, 4) == "████"


CHILD = textwrap.dedent(
    """
    import sys
    from storyengine.progress import Progress
    print("training kto on 12 examples", flush=True)
    progress = Progress("training", 6, say=lambda line: print(line, flush=True), json_every_s=0)
    for step in range(1, 7):
        progress.update(step, detail="loss 0.5")
    progress.close()
    print("promoted v1", flush=True)
    """
)


async def test_the_scheduler_reads_a_rounds_structured_progress(tmp_path):
    """The bot's side: a real child that reports with `Progress` (the scheduler asks it
    for structured lines); its steps reach `job.progress`, its other lines `last_line`
    and the round's log, its outcome the counters."""
    settings = Settings(db_path=tmp_path / "s.db", adapter_dir=tmp_path / "adapters")
    store = await Store(settings.database).open()
    scheduler = TrainingScheduler(
        settings, store, TrainingSchedule(), command=[sys.executable, "-c", CHILD]
    )
    job = await scheduler.start("test")
    await scheduler.wait()
    await store.close()
    assert job.returncode == 0 and job.last_line == "promoted v1"
    assert job.progress is not None
    assert (job.progress.step, job.progress.total, job.progress.detail) == (6, 6, "loss 0.5")
    assert scheduler.outcomes == {"promoted": 1} and job.kind == "promoted"
    log = job.log_path.read_text()
    assert PREFIX not in log  # the log keeps the readable lines
    assert "step 6/6 (100%) · loss 0.5" in log and "training kto on 12 examples" in log
