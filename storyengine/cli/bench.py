"""`storyengine bench serve|learning|soak`."""

from __future__ import annotations

import argparse
import logging

from ..config import Settings
from ..errors import InvalidInput

log = logging.getLogger(__name__)


async def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    """The benchmarks make their own settings (`settings` is unused)."""
    if args.bench == "learning":
        from ..bench.learning import LearningBenchConfig, bench_learning
        from ..learning.audience import load_taste

        try:
            config = LearningBenchConfig(
                rounds=args.rounds,
                reactions=args.reactions,
                openings=args.openings,
                eval_samples=args.eval_samples,
                max_new_tokens=args.max_new_tokens,
                method=args.method,
                learning_rate=args.lr,
                epochs=args.epochs,
                seed=args.seed,
                best_of=args.best_of,
                communities=tuple(
                    name.strip() for name in (args.communities or "").split(",") if name.strip()
                ),
            )
            if config.communities:  # each taste must load before anything runs
                for name in config.communities:
                    load_taste(name)
            else:
                load_taste(args.taste)
            await bench_learning(
                taste_spec=args.taste, config=config, device=args.device, json_path=args.json
            )
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        return 0
    if args.bench == "soak":
        from ..bench.soak import SoakConfig, bench_soak

        try:
            soak = SoakConfig(
                minutes=args.minutes,
                channels=args.channels,
                max_new_tokens=args.max_new_tokens,
                sample_every=args.sample_every,
                warmup=args.warmup,
                seed=args.seed,
                trace_top=args.trace_top,
            )
        except ValueError as exc:
            raise InvalidInput(str(exc)) from None
        results = await bench_soak(
            config=soak, device=args.device, db_path=args.db, json_path=args.json
        )
        return 1 if results["errors"] else 0
    from ..bench.serve import bench_serve

    if args.concurrency < 1 or args.requests < 1 or not 1 <= args.max_new_tokens <= 512:
        raise InvalidInput("--concurrency and --requests must be positive; --max-new-tokens 1..512")
    await bench_serve(
        model_kind=args.model,
        concurrency=args.concurrency,
        requests=args.requests,
        max_new_tokens=args.max_new_tokens,
        device=args.device,
        json_path=args.json,
        max_batch_size=args.max_batch_size,
        best_of=args.best_of,
        remote=args.remote,
    )
    return 0
