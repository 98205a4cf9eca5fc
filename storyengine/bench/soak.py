"""`storyengine bench soak`: does the engine's memory stay flat over hours?

A bot runs for weeks, so memory that grows a little with every turn ends in an
out-of-memory kill. This bench drives the real engine (`StoryEngine` with the batching
scheduler, SQLite in a temporary folder unless `--db` is given) from N simulated channels,
each in a closed loop of what people do in a story: start one, add lines, retry, undo,
react to the storyteller's messages, steer with an author's note or a memory, add lore,
export, and now and then end the story and start the next (half of the time in a new
channel, as a bot that opens a thread per story does), so that per-story and per-channel
state is created and dropped all the time. Every few seconds it samples the process's resident
memory (RSS) and prints it with the turns done so far.

Warm-up lasts until the channels have written 30 turns each (the longest story), and at
least the first 20 % of the run (`--warmup`). Memory rises at first for reasons paid
once: stories grow to the model's full context window (about 15 turns for 1024 tokens),
so the batch's KV cache grows to its largest, the allocator's pools with it, and SQLite's
page cache fills up. One sample swings by tens of percent with what the batch holds at
that instant, so "after warm-up" and "final" are medians over a tenth of the run each:
right after warm-up, and the end. Their difference is the growth that extrapolates to
hours; the slope of a line fitted to the samples after warm-up says the same per hour.
The RSS one sampling interval after the load stopped ("idle") shows what the process
keeps.

Any exception other than a `StoryError` (those are the user's: nothing to undo, a
generation that found no words) counts as an error, and the command then exits non-zero.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import resource
import statistics
import sys
import tempfile
import time
import traceback
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import StoryAlreadyRunning, StoryError
from ..records import Author
from ..sampling import SamplingParams
from .configs import SoakConfig

PREMISES = (
    "A little fox finds a lantern that glows only when someone tells the truth. "
    "She carries it through the forest to the village, where nobody believes her.",
    "Two sisters build a boat out of an old wardrobe and sail across the pond. "
    "On the other side they find an island that was not there yesterday.",
    "A robot who sweeps the library wants to read the books it dusts every night. "
    "One evening a book falls open, and a tiny knight climbs out of it.",
    "The baker's cat goes missing on the morning of the town's big cake contest. "
    "The only clue is a trail of flour that leads up the hill.",
    "A shy dragon is afraid of the dark and asks the moon for help. "
    "The moon agrees, but only if the dragon brings her a song.",
    "Tom finds a map under his bed that leads to the bottom of the garden. "
    "His little sister wants to come too, and she brings her wooden sword.",
    "A snowman wakes up in spring and has one day to see the sea. "
    "A kind crow offers to show him the way if he can keep up.",
    "Mia's grandmother keeps a box that hums a tune when it rains. "
    "Today it is raining, and the tune sounds different.",
)
LINES = (
    "Then the wind began to blow very hard.",
    "Suddenly, a small voice called from behind the tree.",
    "She opened the door slowly and looked inside.",
    '"Can I come with you?" asked the little bird.',
    "Nobody noticed the shadow moving across the wall.",
    "He laughed and said it was the best day ever.",
    "But the path split in two, and one way was dark.",
    "The old man smiled and handed them a golden key.",
    "A loud crash came from the kitchen.",
    "They sat down together and shared their lunch.",
)
"""A player's line is one to three of these, as people write on Discord."""
MEMORIES = (
    "The fox is called Rusty. The village is called Brook End.",
    "Everyone in this story is kind in the end, even the grumpy ones.",
    "It is winter, and the days are short and cold.",
)
NOTES = (
    "Keep the story cheerful and gentle.",
    "Something surprising happens soon.",
    "The story is told like a bedtime tale.",
    "",
)
LORE = (
    ("Pip", "Pip, mouse", "Pip is a brave little mouse who wears a red scarf."),
    ("The Old Oak", "oak, tree", "The Old Oak is the tallest tree and it can whisper."),
    ("Luna", "Luna, moon", "Luna is the moon, kind and a little sleepy."),
)
STORY_TURNS = (6, 30)
"""A story ends after this many storyteller turns (drawn uniformly). A turn adds about
60 tokens (a player's line and the reply), so most stories fill the model's context
window (1024 tokens for the bundled model) and the others end before."""
NEW_THREAD = 0.5
"""Chance that the next story starts in a new channel (a thread of its own)."""
REACT = 0.4
"""Chance that someone reacts to a storyteller's message."""
WARM_TURNS = STORY_TURNS[1]
"""Warm-up lasts until the channels have written this many turns each (on average), and
at least `--warmup` of the run: by then stories of every length have been told, so the
KV cache has held full-context stories."""
WINDOW = 0.1
"""RSS after warm-up and at the end: medians over this fraction of the run, since one
sample swings with what the batch holds at that instant (tens of percent)."""


@dataclass
class Sample:
    t_s: float
    turns: int
    rss_mb: float


@dataclass
class Tally:
    """What the channels did, shared by all of them (one event loop: no locking)."""

    turns: int = 0
    """Storyteller turns written: openings, continuations, retries."""
    ops: Counter[str] = field(default_factory=Counter)
    user_errors: Counter[str] = field(default_factory=Counter)
    errors: int = 0
    error_messages: list[str] = field(default_factory=list)


_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def rss_mb() -> float:
    """The process's resident memory now (Linux: /proc/self/statm); elsewhere the peak
    so far, which is the best the standard library offers."""
    try:
        with open("/proc/self/statm", encoding="ascii") as statm:
            return int(statm.read().split()[1]) * _PAGE / 2**20
    except OSError:
        return peak_rss_mb()


def peak_rss_mb() -> float:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes vs KiB


class Channel:
    """One simulated channel: a closed loop of story operations until the deadline."""

    def __init__(self, engine: Any, index: int, config: SoakConfig, tally: Tally) -> None:
        self.engine = engine
        self.index = index
        self.rng = random.Random(config.seed * 10_007 + index)
        self.tally = tally
        self.thread = 0
        self.story_turns = 0
        self.story_length = 0
        self.active = False
        self.messages: list[tuple[str, str, str]] = []
        """Reactions given in the current story (message, user, emoji): some are removed."""

    @property
    def channel(self) -> str:
        return f"soak-{self.index}" + (f"-t{self.thread}" if self.thread else "")

    def author(self) -> Author:
        n = self.rng.randrange(4)
        return Author(f"user-{self.index}-{n}", f"Player {self.index}.{n}")

    async def run(self, deadline: float) -> None:
        while time.perf_counter() < deadline:
            name, op = self.next_op()
            try:
                await op()
            except StoryError as exc:  # the user's mistake or bad luck: not a failure
                self.tally.user_errors[type(exc).__name__] += 1
            except Exception:
                self.tally.errors += 1
                if len(self.tally.error_messages) < 5:
                    self.tally.error_messages.append(traceback.format_exc())
            self.tally.ops[name] += 1

    def next_op(self) -> tuple[str, Any]:
        if not self.active:
            return "start_story", self.start
        if self.story_turns >= self.story_length:
            return "end_story", self.end
        roll = self.rng.random()
        for name, op, weight in (
            ("continue", self.continue_with_line, 0.60),
            ("continue_empty", self.continue_empty, 0.08),
            ("retry", self.retry, 0.10),
            ("undo", self.undo, 0.06),
            ("authors_note", self.note, 0.03),
            ("memory", self.memory, 0.02),
            ("export", self.export, 0.05),
            ("lore", self.lore, 0.03),
        ):
            if roll < weight:
                return name, op
            roll -= weight
        return "unreact", self.unreact

    async def start(self) -> None:
        premise = self.rng.choice(PREMISES)
        self.active, self.story_turns, self.messages = True, 0, []
        self.story_length = self.rng.randint(*STORY_TURNS)
        try:
            result = await self.engine.start_story(self.channel, premise, author=self.author())
        except StoryAlreadyRunning:  # left open in the database by an earlier run
            return
        await self.wrote(result)

    async def continue_with_line(self) -> None:
        line = " ".join(self.rng.sample(LINES, self.rng.randint(1, 3)))
        await self.wrote(await self.engine.continue_story(self.channel, self.author(), line))

    async def continue_empty(self) -> None:
        await self.wrote(await self.engine.continue_story(self.channel, self.author()))

    async def retry(self) -> None:
        await self.wrote(await self.engine.retry(self.channel))

    async def undo(self) -> None:
        await self.engine.undo(self.channel)

    async def note(self) -> None:
        await self.engine.set_authors_note(self.channel, self.rng.choice(NOTES))

    async def memory(self) -> None:
        await self.engine.set_memory(self.channel, self.rng.choice(MEMORIES))

    async def export(self) -> None:
        await self.engine.export_markdown(self.channel)

    async def lore(self) -> None:
        name, triggers, text = self.rng.choice(LORE)
        await self.engine.add_lore(self.channel, name, triggers, text)

    async def unreact(self) -> None:
        if self.messages:
            message, user, emoji = self.messages.pop(self.rng.randrange(len(self.messages)))
            await self.engine.record_reaction(message, user, emoji, added=False)

    async def end(self) -> None:
        self.active = False
        await self.engine.end_story(self.channel)
        if self.rng.random() < NEW_THREAD:
            self.thread += 1

    async def wrote(self, result: Any) -> None:
        """A storyteller turn was shown: count it, and maybe someone reacts to it."""
        self.tally.turns += 1
        self.story_turns += 1
        if self.rng.random() >= REACT:
            return
        message = f"{self.channel}-m{result.generation_id}"
        await self.engine.link_message(message, result.generation_id)
        user = self.author().id
        emoji, _ = self.rng.choice(self.engine.settings.reaction_values)
        await self.engine.record_reaction(message, user, emoji, added=True)
        self.messages.append((message, user, emoji))


async def bench_soak(
    *,
    config: SoakConfig,
    device: str = "cpu",
    db_path: Path | None = None,
    json_path: Path | None = None,
) -> dict[str, Any]:
    import torch

    from ..story.engine import StoryEngine

    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("storyengine bench: --device cuda asked for, but CUDA is not available")
    torch.manual_seed(config.seed)  # the generations draw from it (no per-request seed)
    with tempfile.TemporaryDirectory(prefix="taleweaver-soak-") as scratch:
        settings = Settings(
            db_path=db_path or Path(scratch) / "soak.db",
            adapter_dir=Path(scratch) / "adapters",
            device=device,
            sampling=SamplingParams(max_new_tokens=config.max_new_tokens),
            max_batch_size=max(config.channels, 1),
        )
        print(f"loading the engine on {device}…", file=sys.stderr, flush=True)
        async with StoryEngine(settings) as engine:
            results = await _soak(engine, config)
            if device == "cuda":  # the KV cache lives there, not in the RSS
                results["peak_gpu_mb"] = torch.cuda.max_memory_allocated() / 2**20
            results["setup"] = {
                "model": engine.narrator.info.model_id,
                "device": device,
                "minutes": config.minutes,
                "channels": config.channels,
                "max_new_tokens": config.max_new_tokens,
                "sample_every_s": config.sample_every,
                "warmup_fraction": config.warmup,
                "seed": config.seed,
                "db": str(db_path) if db_path else "temporary",
                "torch_threads": torch.get_num_threads(),
                "malloc_arena_max": os.environ.get("MALLOC_ARENA_MAX"),
            }
    print_summary(results)
    if json_path is not None:
        text = json.dumps(results, indent=2) + "\n"
        await asyncio.to_thread(json_path.write_text, text, encoding="utf-8")
    return results


async def _soak(engine: Any, config: SoakConfig) -> dict[str, Any]:
    tally = Tally()
    samples: list[Sample] = []
    tracing = config.trace_top > 0
    if tracing:
        import tracemalloc

        tracemalloc.start(8)
    snapshots: list[Any] = []
    warm_s = config.seconds * config.warmup
    start = time.perf_counter()
    deadline = start + config.seconds

    def sample() -> None:
        samples.append(Sample(time.perf_counter() - start, tally.turns, rss_mb()))
        print_sample(samples)
        if tracing and not snapshots and samples[-1].t_s >= warm_s:
            snapshots.append(tracemalloc.take_snapshot())

    print_header(config)
    channels = [Channel(engine, i, config, tally) for i in range(config.channels)]
    load = asyncio.gather(*(c.run(deadline) for c in channels))
    while True:  # under load: every `sample_every` seconds, and once at the deadline
        sample()
        left = deadline - time.perf_counter()
        if left <= 0:
            break
        done, _ = await asyncio.wait({load}, timeout=min(config.sample_every, left))
        if done:  # only when a channel failed outside its operations
            break
    await load  # the last operations finish
    wall = time.perf_counter() - start
    await asyncio.sleep(config.sample_every)  # the scheduler's worker finishes too
    idle = rss_mb()
    print(f"{'idle':>8} {tally.turns:>7} {'':>8} {idle:>8.0f}", flush=True)
    if tracing:
        if not snapshots:  # a run shorter than one sampling interval after warm-up
            snapshots.append(tracemalloc.take_snapshot())
        python_growth = _python_growth(snapshots[0], tracemalloc.take_snapshot(), config)
        tracemalloc.stop()
    results = summarise(samples, tally, config, wall)
    results["rss_idle_mb"] = idle
    if tracing:
        results["python_growth"] = python_growth
    return results


def _python_growth(before: Any, after: Any, config: SoakConfig) -> dict[str, Any]:
    """Python's own heap from the end of warm-up to the end: the net change, and the
    places that grew most (each with its four innermost frames, innermost first)."""
    stats = after.compare_to(before, "traceback")
    grown = [s for s in stats if s.size_diff > 0][: config.trace_top]
    return {
        "net_kb": sum(s.size_diff for s in stats) / 1024,
        "top": [
            {
                "size_kb": s.size_diff / 1024,
                "count": s.count_diff,
                "where": [f"{f.filename}:{f.lineno}" for f in reversed(s.traceback)][:4],
            }
            for s in grown
        ],
    }


def summarise(
    samples: list[Sample], tally: Tally, config: SoakConfig, wall: float
) -> dict[str, Any]:
    """The figures: RSS after warm-up and at the end (medians over a tenth of the run
    each), growth between them (in % and as a fitted slope per hour), peak,
    throughput, errors."""
    warm_s, window = config.seconds * config.warmup, config.seconds * WINDOW
    warm_turns = WARM_TURNS * config.channels
    reached = next((s.t_s for s in samples if s.turns >= warm_turns), None)
    after = [s for s in samples if s.t_s >= max(warm_s, reached or 0)] or samples[-1:]
    first = [s.rss_mb for s in after if s.t_s < after[0].t_s + window] or [after[0].rss_mb]
    last = [s.rss_mb for s in after if s.t_s > samples[-1].t_s - window] or [after[-1].rss_mb]
    warm, final = statistics.median(first), statistics.median(last)
    slope = 0.0
    if len(after) >= 2 and after[-1].t_s > after[0].t_s:
        fit = statistics.linear_regression([s.t_s for s in after], [s.rss_mb for s in after])
        slope = fit.slope * 3600
    return {
        "samples": [asdict(s) for s in samples],
        "turns": tally.turns,
        "turns_per_s": tally.turns / wall if wall > 0 else 0.0,
        "wall_s": wall,
        "rss_start_mb": samples[0].rss_mb,
        "warmup_s": after[0].t_s,
        "warmup_turns": after[0].turns,
        "warmed_up": reached is not None,
        "rss_after_warmup_mb": warm,
        "rss_final_mb": final,
        "growth_after_warmup_pct": 100 * (final - warm) / warm,
        "slope_after_warmup_mb_per_h": slope,
        "rss_peak_sampled_mb": max(s.rss_mb for s in samples),
        "rss_high_water_mb": peak_rss_mb(),
        "ops": dict(sorted(tally.ops.items())),
        "user_errors": dict(sorted(tally.user_errors.items())),
        "errors": tally.errors,
        "error_messages": tally.error_messages,
    }


def print_header(config: SoakConfig) -> None:
    print(
        f"soak: {config.channels} channels for {config.minutes:g} min, up to "
        f"{config.max_new_tokens} new tokens a turn, RSS every {config.sample_every:g} s; "
        f"warm-up: the first {config.warmup:.0%}",
        flush=True,
    )
    print(f"{'time':>8} {'turns':>7} {'turns/s':>8} {'RSS MB':>8}", flush=True)


def print_sample(samples: list[Sample]) -> None:
    s = samples[-1]
    rate = 0.0
    if len(samples) > 1 and s.t_s > samples[-2].t_s:
        rate = (s.turns - samples[-2].turns) / (s.t_s - samples[-2].t_s)
    minutes, seconds = divmod(int(s.t_s), 60)
    print(f"{minutes:>5}:{seconds:02} {s.turns:>7} {rate:>8.2f} {s.rss_mb:>8.0f}", flush=True)


def print_summary(results: dict[str, Any]) -> None:
    r = results
    if not r["warmed_up"]:
        print(
            f"not warmed up: fewer than {WARM_TURNS} turns per channel; the figures after "
            f"warm-up are from {r['warmup_s']:.0f} s on, and include warm-up"
        )
    print(
        f"RSS start {r['rss_start_mb']:.0f} MB · after warm-up ({r['warmup_s']:.0f} s, "
        f"{r['warmup_turns']} turns) "
        f"{r['rss_after_warmup_mb']:.0f} MB · final {r['rss_final_mb']:.0f} MB · "
        f"growth after warm-up {r['growth_after_warmup_pct']:+.1f} % "
        f"({r['slope_after_warmup_mb_per_h']:+.0f} MB/h) · idle {r['rss_idle_mb']:.0f} MB"
    )
    print(
        f"peak {r['rss_peak_sampled_mb']:.0f} MB sampled, {r['rss_high_water_mb']:.0f} MB "
        f"high-water"
        + (f", GPU {r['peak_gpu_mb']:.0f} MB" if "peak_gpu_mb" in r else "")
        + f" · {r['turns']} turns, {r['turns_per_s']:.2f} turns/s · "
        f"errors {r['errors']}"
        + (f" (user-facing, not counted: {r['user_errors']})" if r["user_errors"] else "")
    )
    if "python_growth" in r:
        growth = r["python_growth"]
        print(f"Python's heap after warm-up: {growth['net_kb']:+.0f} KiB; grew most:")
        for top in growth["top"]:
            where = " < ".join(top["where"])
            print(f"  {top['size_kb']:+.1f} KiB ({top['count']:+} blocks) {where}")
    for message in r["error_messages"]:
        print(message, file=sys.stderr)
