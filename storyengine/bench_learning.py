"""`storyengine bench learning`: the whole loop without Discord.

A simulated audience with a stated taste reacts to the storyteller's story openings;
each round then trains on those reactions, gates and (maybe) promotes the adapter, which
the running engine picks up. Before the first round and after each, the audience's
approval, 👍 / (👍 + 👎), is measured on fresh prompts never used for training, with the
perplexity on held-out stories and the repetition of the samples.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .audience import Taste, load_taste
from .config import Settings
from .evaluation import perplexity, repetition
from .feedback import DatasetConfig
from .progress import Progress
from .records import Author
from .rounds import RoundConfig, heldout_stories, run_round
from .sampling import SamplingParams
from .training import TrainConfig

NAMES = ("Lily", "Tom", "Mia", "Ben", "Sue", "Max", "Anna", "Sam", "Lucy", "Jack", "Emma", "Leo")
PLACES = (
    "park",
    "garden",
    "kitchen",
    "school",
    "beach",
    "library",
    "market",
    "playground",
    "hill",
    "attic",
)
THINGS = (
    "a red ball",
    "a shiny key",
    "a small box",
    "a kite",
    "a blue hat",
    "a toy car",
    "a book",
    "a cake",
)


def story_prompts(seed: int = 0) -> list[str]:
    """Neutral story openings (no animals, no moods), in a fixed shuffled order."""
    prompts = [
        f"Once upon a time, {name} went to the {place} and found {thing}."
        for name, place, thing in itertools.product(NAMES, PLACES, THINGS)
    ]
    random.Random(seed).shuffle(prompts)
    return prompts


@dataclass(frozen=True)
class LearningBenchConfig:
    rounds: int = 3
    reactions: int = 200
    """Continuations the audience reacts to in each round."""
    openings: int = 2
    """Openings shown per prompt (as retries show them): the audience's verdicts on
    them make preference pairs as well as single labels. (Four made three times the
    pairs from the same reactions, but rounds on them overshot the perplexity bound or
    failed the gate's preference accuracy.)"""
    eval_samples: int = 200
    """Continuations on fresh prompts per approval measurement."""
    max_new_tokens: int = 64
    learning_rate: float | None = None
    """None: the method's default."""
    epochs: float | None = None
    method: str = "dpo"
    seed: int = 0

    def __post_init__(self) -> None:
        if self.rounds < 0:
            raise ValueError("--rounds must be 0 or more")
        if not 1 <= self.openings <= self.reactions:
            raise ValueError("--openings must be at least 1 and at most --reactions")
        if self.eval_samples < 1 or self.max_new_tokens < 1:
            raise ValueError("--eval-samples and --max-new-tokens must be at least 1")


async def _openings(engine: Any, prompts: list[str], tag: str) -> list[tuple[str, int, str]]:
    """Start one story per prompt (concurrently: the scheduler batches them)."""
    author = Author("sim-author", "Sim")
    limit = asyncio.Semaphore(64)

    progress = Progress(f"{tag} openings", len(prompts), say=_progress, unit="story")

    async def one(i: int, prompt: str) -> tuple[str, int, str]:
        async with limit:
            result = await engine.start_story(f"{tag}-{i}", prompt, author=author)
            progress.advance()
            return prompt, result.generation_id, result.text

    with progress:
        return await asyncio.gather(*(one(i, p) for i, p in enumerate(prompts)))


def _approval(taste: Taste, samples: list[tuple[str, int, str]]) -> tuple[float, int]:
    votes = [taste(text, prompt=prompt) for prompt, _, text in samples]
    up, down = votes.count(True), votes.count(False)
    return (up / (up + down) if up + down else 0.0), up + down


async def bench_learning(
    *, taste_spec: str, config: LearningBenchConfig, device: str, json_path: Path | None
) -> dict[str, Any]:
    import torch

    from .engine import StoryEngine

    torch.manual_seed(config.seed)  # the unseeded generations draw from this
    taste = load_taste(taste_spec)
    prompts = story_prompts(config.seed)
    eval_prompts = prompts[: config.eval_samples]
    train_prompts = iter(prompts[config.eval_samples :] * 10)
    texts = heldout_stories()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="taleweaver-bench-") as scratch:
        settings = Settings(
            db_path=Path(scratch) / "bench.db",
            adapter_dir=Path(scratch) / "adapters",
            device=device,
            sampling=SamplingParams(max_new_tokens=config.max_new_tokens),
            max_batch_size=64,
        )
        round_config = RoundConfig(
            method=config.method,  # type: ignore[arg-type]
            data=DatasetConfig(seed=config.seed),
            train=TrainConfig(
                learning_rate=config.learning_rate, epochs=config.epochs, seed=config.seed
            ),
        )
        async with StoryEngine(settings) as engine:
            model = engine.narrator.model
            for round_no in range(config.rounds + 1):
                started = time.perf_counter()
                row: dict[str, Any] = {"round": round_no, "promoted": False}
                if round_no > 0:
                    # Several openings per prompt, as retries show them: the audience's
                    # verdicts on them make preference pairs as well as single labels.
                    n = config.reactions // config.openings
                    batch = [next(train_prompts) for _ in range(n)]
                    shown = await _openings(engine, batch * config.openings, f"train{round_no}")
                    for i, (prompt, generation_id, text) in enumerate(shown):
                        verdict = taste(text, prompt=prompt)
                        if verdict is None:
                            continue
                        message = f"sim-{round_no}-{i}"
                        await engine.link_message(message, generation_id)
                        emoji = "👍" if verdict else "👎"
                        await engine.record_reaction(
                            message, f"sim-user-{i % 50}", emoji, added=True
                        )
                    result = await run_round(settings, round_config, say=_progress)
                    row["promoted"] = result.status == "promoted"
                    row["gate"] = result.reason or result.status
                    if result.version is not None:
                        row["version"] = result.version.name
                samples = await _openings(engine, eval_prompts, f"eval{round_no}")
                row["approval"], row["votes"] = _approval(taste, samples)
                row["repeat4"], row["distinct2"] = repetition([t for _, _, t in samples])
                serving = await engine.sync_adapter()
                row["perplexity"] = await asyncio.to_thread(
                    perplexity, model.model, model.tokenizer, serving, texts
                )
                row["seconds"] = time.perf_counter() - started
                rows.append(row)
                _print_row(row)
    results = {"taste": taste_spec, "rounds": rows}
    if json_path is not None:
        await asyncio.to_thread(json_path.write_text, json.dumps(results, indent=2) + "\n", "utf-8")
    return results


def _progress(line: str) -> None:
    print("  " + line, file=sys.stderr, flush=True)


def _print_row(row: dict[str, Any]) -> None:
    if row["round"] == 0:
        heads = ("round", "approval", "votes", "ppl", "distinct2", "repeat4", "promoted", "seconds")
        widths = (5, 9, 6, 7, 9, 8, 9, 8)
        print(" ".join(f"{h:>{w}}" for h, w in zip(heads, widths, strict=True)) + "  gate")
    print(
        f"{row['round']:>5} {row['approval']:>9.3f} {row['votes']:>6} {row['perplexity']:>7.2f} "
        f"{row['distinct2']:>9.3f} {row['repeat4']:>8.3f} {row['promoted']!s:>9} "
        f"{row['seconds']:>8.1f}  "
        f"{row.get('gate', '')}",
        flush=True,
    )
