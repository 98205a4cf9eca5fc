"""`storyengine bench serve|learning|soak|store`."""

from __future__ import annotations

import argparse
import logging

from ..config import Settings
from ..errors import InvalidInput
from ..options import from_args

log = logging.getLogger(__name__)


async def run_bench(args: argparse.Namespace, settings: Settings) -> int:
    """The benchmarks make their own settings (`settings` is unused)."""
    if args.bench == "learning":
        from ..bench.learning import LearningBenchConfig, bench_learning
        from ..learning.audience import load_taste

        config = from_args(LearningBenchConfig, args)
        try:
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

        soak = from_args(SoakConfig, args)
        results = await bench_soak(
            config=soak, device=args.device, db_path=args.db, json_path=args.json
        )
        return 1 if results["errors"] else 0
    if args.bench == "store":
        from ..bench.store import StoreBenchConfig, bench_store, failed

        results = await bench_store(config=from_args(StoreBenchConfig, args), json_path=args.json)
        return 1 if failed(results) else 0
    from ..bench.serve import ServeBenchConfig, bench_serve

    await bench_serve(
        from_args(ServeBenchConfig, args, remote=args.remote),
        device=args.device,
        json_path=args.json,
    )
    return 0
