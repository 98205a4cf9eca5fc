"""What each benchmark is asked: one config per bench, its fields the command's options
(`options.add_options`). Light to import (no torch), so that the command line's parser
is built from them without loading a model's libraries."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from ..config import DEFAULT_BEST_OF
from ..learning.training import EPOCHS_HELP, LEARNING_RATE_HELP
from ..options import check_options, option
from ..sampling import MAX_BEST_OF


@dataclass(frozen=True)
class ServeBenchConfig:
    """`storyengine bench serve`: its options are these fields (`options.add_options`)."""

    model: Literal["default", "gpt2-config"] = option(
        "default", help="bundled model, or GPT-2 small's architecture with random weights"
    )
    concurrency: int = option(16, low=1, help="simulated channels")
    requests: int = option(64, low=1, help="requests in all")
    max_new_tokens: int = option(64, low=1, high=512, help="tokens per request")
    max_batch_size: int | None = option(
        None, low=1, help="scheduler batch bound (default: concurrency)"
    )
    best_of: int = option(
        1,
        low=1,
        high=16,
        flags=("--best-of",),
        help="also run the workload with N candidates per sampling request",
    )
    remote: str | None = option(
        None,
        cli=False,  # an option with an optional value: the parser spells it out
        help="also run the workload over HTTP through a completions service: one started "
        "here (local), or the one at this URL",
    )

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class LearningBenchConfig:
    """`storyengine bench learning`: its options are these fields (`options.add_options`)."""

    rounds: int = option(3, low=0, help="rounds of generate, react, train, gate, promote")
    reactions: int = option(
        200, low=1, help="continuations the audience reacts to in each round (per community)"
    )
    openings: int = option(
        2,
        low=1,
        help="openings shown per prompt (as retries show them): verdicts on them make "
        "preference pairs as well as single labels",
    )
    eval_samples: int | None = option(
        None,
        low=1,
        help="fresh prompts per approval measurement (default: 200; 120 with --communities, "
        "whose three lineages are each measured every round)",
    )
    max_new_tokens: int = option(64, low=1, high=512, help="tokens per continuation")
    learning_rate: float | None = option(None, flags=("--lr",), help=LEARNING_RATE_HELP)
    epochs: float | None = option(None, help=EPOCHS_HELP)
    method: Literal["auto", "kto", "dpo"] = option(
        "auto", help="auto (as the bot trains): DPO with enough preference pairs, else KTO"
    )
    seed: int = option(0, help="changes the prompts, the split and the training")
    best_of: int = option(
        DEFAULT_BEST_OF,
        low=1,
        high=MAX_BEST_OF,
        help="candidates per turn once a reward model is promoted (1: best-of-n off)",
    )
    communities: tuple[str, ...] = option(
        (),
        help="TASTE_A,TASTE_B: several simulated servers, each with its own taste and adapter "
        "lineage, beside a shared-adapter arm (instead of --taste)",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.openings > self.reactions:
            raise ValueError("--openings must be at least 1 and at most --reactions")
        if len(set(self.communities)) != len(self.communities):
            raise ValueError("--communities names each taste once")

    @property
    def prompts_measured(self) -> int:
        """`eval_samples`, or its default: a run of several communities measures three
        lineages' adapters each round (each on as many prompts, three candidates each),
        and fewer prompts save minutes of it on a CPU, at ±4.5 points instead of ±3.5
        per figure (at 50 % approval)."""
        return self.eval_samples or (120 if self.communities else 200)


@dataclass(frozen=True)
class SoakConfig:
    """`storyengine bench soak`: its options are these fields (`options.add_options`)."""

    minutes: float = option(5.0, above=0, help="how long the load runs")
    channels: int = option(16, low=1, help="simulated channels")
    max_new_tokens: int = option(48, low=1, high=512, help="tokens per storyteller turn")
    sample_every: float = option(5.0, above=0, help="seconds between RSS samples")
    warmup: float = option(
        0.2,
        check=lambda share: None if 0 <= share < 1 else "a fraction from 0 to below 1",
        help="warm-up lasts at least this fraction of the run (and 30 turns per channel)",
    )
    seed: int = option(0, help="changes what the channels do")
    trace_top: int = option(
        0,
        low=0,
        flags=("--trace-top",),
        help="tracemalloc: the N places where Python's allocations grew after warm-up (slow)",
    )

    def __post_init__(self) -> None:
        check_options(self)

    @property
    def seconds(self) -> float:
        return self.minutes * 60


@dataclass(frozen=True)
class StoreBenchConfig:
    """`storyengine bench store`: its options are these fields (`options.add_options`)."""

    writers: int = option(4, low=1, high=64, help="writer processes, each with its own Store")
    events: int = option(
        500,
        low=1,
        high=100_000,
        help="events per writer, alternately a reaction and a turn",
    )
    db_url: str | None = option(
        None,
        secret=True,
        help="an empty PostgreSQL database to run in (postgresql://...; the bench leaves its "
        "rows there: drop it afterwards); default: a temporary SQLite file",
    )

    def __post_init__(self) -> None:
        check_options(self)
        if self.db_url is not None and not self.db_url.startswith(("postgresql://", "postgres://")):
            from ..config import redact_url

            raise ValueError(  # the URL without its password
                f"--db-url: expected a postgresql:// URL, got {redact_url(self.db_url)}"
            )
