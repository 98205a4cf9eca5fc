"""`storyengine train`, `adapters` and `feedback`: the learning loop by hand."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from typing import Any

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


async def run_train_worker(args: argparse.Namespace, settings: Settings) -> int:
    """`train worker`: rounds that front ends with TRAIN_MODE=external recorded in the
    shared database, taken oldest first and run here (a GPU box), one at a time; each
    request notes how its round ended. The promotion goes through the database and the
    shared adapter directory, where the serving processes pick it up."""
    import os
    import socket

    from ..learning.rounds import RoundConfig, run_round
    from ..storage.store import Store

    if args.poll <= 0:
        raise InvalidInput("--poll must be more than 0 seconds")
    if args.lease <= 0:
        raise InvalidInput("--lease must be more than 0 seconds")
    train = from_args(TrainConfig, args)
    worker = f"{socket.gethostname()}:{os.getpid()}"
    store = await Store(settings.database).open()
    try:
        while True:
            taken = await store.take_round_request(worker, lease_s=args.lease)
            if taken is None:
                if args.once:
                    print("no round requested")
                    return 0
                await asyncio.sleep(args.poll)
                continue
            request, community, reason = taken
            lineage = f"community {community}" if community else "the shared adapter"
            print(f"round request #{request} ({reason}): training {lineage}", flush=True)
            config = from_args(RoundConfig, args, train=train, community=community)
            # Renewed while the round runs: if this process dies, another worker takes
            # the request once its lease runs out (the round lock keeps the two apart).
            renewing = asyncio.create_task(_renew(store, request, worker, args.lease / 3))
            try:
                result = await run_round(settings, config, say=echo)
            except Exception as exc:  # the next request still gets its turn
                log.exception("round request #%d failed", request)
                outcome = f"failed: {exc or type(exc).__name__}"
            else:
                name = f" {result.version.name}" if result.version is not None else ""
                outcome = f"{result.status}{name}: {result.reason}"
            finally:
                renewing.cancel()
            await store.finish_round_request(request, outcome)
            print(f"round request #{request}: {outcome}", flush=True)
            if args.once:
                return 0
    finally:
        await store.close()


async def _renew(store: Any, request: int, worker: str, every_s: float) -> None:
    while True:
        await asyncio.sleep(every_s)
        try:
            if not await store.renew_round_request(request, worker):
                log.warning("round request #%d was taken by another worker", request)
                return
        except Exception:  # the database away for a moment: try again next time
            log.exception("could not renew round request #%d", request)


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
