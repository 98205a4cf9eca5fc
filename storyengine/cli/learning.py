"""`storyengine train`, `adapters` and `feedback`: the learning loop by hand."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys

from ..config import Settings
from ..errors import InvalidInput
from ..learning.training import TrainConfig
from ..options import from_args
from ..progress import echo
from .common import say_loading, write_text

log = logging.getLogger(__name__)


async def run_train_sft(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.scheduling import watch_parent
    from ..learning.sft import CorpusTrainConfig, run_sft

    watch_parent()  # started by a bot: end with it

    config = from_args(CorpusTrainConfig, args)
    say_loading(settings)
    version, promoted, report = await run_sft(settings, args.corpus, config, say=echo)
    if promoted:
        print(f"promoted v{version}")
    elif report["passed"]:
        print(f"registered v{version} as a candidate: `storyengine adapters promote {version}`")
    else:
        print(f"registered v{version} as a candidate: {'; '.join(report['reasons'])}")
    return 0


async def run_train_round(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.rounds import RoundConfig, run_round
    from ..learning.scheduling import watch_parent

    watch_parent()  # started by a bot: end with it
    train = from_args(TrainConfig, args)
    result = await run_round(
        settings,
        from_args(RoundConfig, args, train=train),
        say=echo,
    )
    if result.status == "promoted":
        assert result.version is not None
        print(f"promoted {result.version.name}")
    elif result.status == "rejected":
        assert result.version is not None
        print(f"rejected {result.version.name}: {result.reason}")
    else:
        print(f"skipped: {result.reason}")
    return 0


async def run_adapters(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.registry import AdapterRegistry
    from ..storage.store import Store

    if args.adapters == "compare":  # reads only: never creates a database
        return await run_compare(args, settings)

    store = await Store(settings.database).open()
    try:
        registry = await AdapterRegistry(store, settings.adapter_dir).open()
        if args.adapters == "promote":
            promoted = await registry.promote(args.version)
            print(f"promoted v{promoted.version}: a running bot serves it from its next story turn")
        elif args.adapters == "rollback":
            now = await registry.rollback()
            print(f"rolled back: now serving {f'v{now.version}' if now else 'the base model'}")
        else:
            versions = await registry.list()
            if not versions:
                print("no adapters yet")
            for v in versions:
                print(v.summary())
    finally:
        await store.close()
    return 0


async def run_compare(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.compare import compare_adapters, default_prompts

    if not 1 <= args.prompts <= 100:
        raise InvalidInput("--prompts must be between 1 and 100")
    if not 1 <= args.max_new_tokens <= 512:
        raise InvalidInput("--max-new-tokens must be between 1 and 512")
    prompts = [p for p in args.prompt or [] if p.strip()] or default_prompts(args.prompts)
    comparison = await compare_adapters(
        settings,
        args.a,
        args.b,
        prompts=prompts,
        max_new_tokens=args.max_new_tokens,
        seed=args.seed,
        community=args.community,
    )
    print("\n".join(comparison.lines()))
    return 0


async def run_feedback_import(args: argparse.Namespace, settings: Settings) -> int:
    import uuid

    from ..learning.datasets import parse_import
    from ..storage.store import Store

    try:
        text = await asyncio.to_thread(args.file.read_text, encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidInput(f"cannot read {args.file}: {exc}") from None
    try:
        rows = parse_import(text.splitlines())
    except InvalidInput as exc:
        raise InvalidInput(f"{args.file}: {exc}; nothing was imported") from None
    store = await Store(settings.database).open()
    try:
        counts = await store.import_feedback(rows, uuid.uuid4().hex[:8])
    finally:
        await store.close()
    print(
        f"imported {counts['pairs']} preference pairs and {counts['labels']} labelled "
        f"examples ({counts['stories']} stories) into {settings.db_path}"
    )
    return 0


async def run_feedback_export(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from ..learning.datasets import build_datasets
    from ..storage.store import Store

    store = await Store(settings.database).open()
    try:
        datasets = await build_datasets(store)
    finally:
        await store.close()
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in datasets.rows())
    if args.out:
        await asyncio.to_thread(write_text, str(args.out), lines)
    else:
        sys.stdout.write(lines)
    print(
        f"{len(datasets.pairs)} preference pairs, {len(datasets.examples)} labelled examples",
        file=sys.stderr,
    )
    return 0


async def run_feedback_stats(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.stats import feedback_summary, render_chart, summary_lines
    from ..storage.store import Store

    store = await Store(settings.database).open(create=False)
    try:
        summary = await feedback_summary(store, args.community)
    finally:
        await store.close()
    for line in summary_lines(summary):
        print(line)
    if args.png:
        png = await asyncio.to_thread(render_chart, summary)
        await asyncio.to_thread(args.png.write_bytes, png)
        print(f"chart written to {args.png}", file=sys.stderr)
    return 0
