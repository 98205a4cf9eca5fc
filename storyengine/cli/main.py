"""`storyengine`: the terminal storyteller and the engine's admin commands.

storyengine generate "Once upon a time, a little fox" --seed 1
storyengine chat --db stories.db --channel kitchen-table
storyengine db migrate | status | backup FILE
storyengine feedback stats --png chart.png
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any, TextIO

from ..config import DEFAULT_BEST_OF, Settings
from ..errors import InvalidInput, StoryError
from ..learning.training import METHOD_DEFAULTS, TrainConfig
from ..progress import echo, resolve_mode
from ..records import Author
from ..sampling import PRESETS, SamplingParams, preset
from ..version import __version__

log = logging.getLogger(__name__)

CHAT_HELP = """\
Commands (anything else you type is your line; the storyteller continues it):
  /start PREMISE              open a story with PREMISE and let the storyteller begin
  /continue [TEXT]            add TEXT (optional) and let the storyteller continue
  /retry                      write the storyteller's last turn again
  /alts                       list the alternatives written for the last turn
  /pick N                     make alternative N the story's turn (a preference, learned from)
  /swipe [prev|next]          show the last turn's previous (or next) alternative in its place
  /good, /bad                 like or dislike the storyteller's last turn (learned from)
  /undo                       take back the last turn (your line and its reply)
  /memory TEXT                what the storyteller should always remember ("/memory" clears)
  /note TEXT                  author's note: steers the next turns ("/note" clears)
  /lore NAME: TRIGGERS: TEXT  a character or place, recalled when a trigger word appears
  /lore                       list lore cards;  /unlore NAME  removes one
  /character [NAME] [HINT]    the storyteller drafts a character;  /setting [HINT]  a place
  /keep                       keep the last draft as a lore card
  /import FILE                a SillyTavern card (JSON, PNG) or world info, or a NovelAI
                              lorebook, into the story's lore
  /export-lore FILE           the story's lore as SillyTavern world info
  /settings [preset=NAME] [temperature=T] [length=N] [best_of=N]   this channel's style
  /recap                      the story so far, in brief
  /context                    what the storyteller saw for its last turn, part by part
  /export [FILE]              the story as Markdown (to FILE, or printed)
  /save FILE                  the story as a story file;  /load FILE  starts one here
  /end                        end the story
  /help                       this help;  /quit  leave (the story stays open)
Ctrl-C while the storyteller writes stops it."""


def _add_schedule_args(parser: argparse.ArgumentParser) -> None:
    """--lr and --epochs, with the training methods' defaults (METHOD_DEFAULTS) shown."""
    (dpo_lr, dpo_epochs), (kto_lr, kto_epochs) = METHOD_DEFAULTS["dpo"], METHOD_DEFAULTS["kto"]
    parser.add_argument(
        "--lr", type=float, help=f"learning rate (default: DPO {dpo_lr:g}, KTO {kto_lr:g})"
    )
    parser.add_argument(
        "--epochs", type=float, help=f"(default: DPO {dpo_epochs:g}, KTO {kto_epochs:g})"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="storyengine",
        description="Taleweaver's story engine: tell stories in the terminal, manage the database.",
    )
    parser.add_argument(
        "--version", action="version", version=f"storyengine (taleweaver) {__version__}"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    gen = sub.add_parser("generate", help="print a continuation of PROMPT")
    gen.add_argument("prompt", metavar="PROMPT")
    _add_adapter_arg(gen)
    _add_storage_args(gen, adapters=True)
    _add_sampling_args(gen)

    chat = sub.add_parser("chat", help="tell a story interactively (reads stdin; pipes work)")
    _add_storage_args(chat)
    chat.add_argument(
        "--channel", default="terminal", help="story channel name (default: terminal)"
    )
    chat.add_argument(
        "--author", default=os.environ.get("USER") or "you", help="your name in the story"
    )
    _add_adapter_arg(chat)

    service = sub.add_parser(
        "serve",
        help="the generator behind HTTP: OpenAI-compatible /v1/completions, /v1/models, "
        "/health, /metrics",
    )
    service.add_argument(
        "--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)"
    )
    service.add_argument("--port", type=int, default=8000, help="port (default: 8000; 0: any free)")
    _add_storage_args(service, adapters=True)

    db = sub.add_parser(
        "db", help="the database: migrate, status, or backup FILE (safe while the bot runs)"
    )
    db.add_argument("action", choices=["migrate", "status", "backup"])
    db.add_argument("file", nargs="?", type=Path, metavar="FILE", help="backup: where to write")
    _add_storage_args(db)
    feedback = sub.add_parser("feedback", help="training data made from the audience's feedback")
    feedback_sub = feedback.add_subparsers(dest="feedback", required=True, metavar="ACTION")
    export = feedback_sub.add_parser("export", help="write preference pairs and labelled examples")
    export.add_argument("--format", choices=["jsonl"], default="jsonl")
    export.add_argument("--out", type=Path, help="file to write (default: standard output)")
    _add_storage_args(export)
    import_ = feedback_sub.add_parser(
        "import", help="add the pairs and labelled examples of a JSONL file (as export writes)"
    )
    import_.add_argument("file", type=Path, metavar="FILE")
    _add_storage_args(import_)
    stats = feedback_sub.add_parser(
        "stats", help="approval per adapter version and reactions per day (text, or a PNG chart)"
    )
    stats.add_argument("--png", type=Path, metavar="FILE", help="also write the chart to FILE")
    stats.add_argument("--community", help="one server's stories only (its id)")
    _add_storage_args(stats)

    train = sub.add_parser("train", help="fine-tune the LoRA adapter on the audience's feedback")
    train_sub = train.add_subparsers(dest="train", required=True, metavar="ROUND")
    round_ = train_sub.add_parser(
        "round", help="one round: datasets, training, the gate, then promote or reject"
    )
    round_.add_argument(
        "--method",
        choices=["auto", "kto", "dpo"],
        default="auto",
        help="auto: DPO with enough preference pairs, else KTO",
    )
    _add_schedule_args(round_)
    round_.add_argument("--min-examples", type=int, default=TrainConfig.min_examples)
    round_.add_argument(
        "--community",
        metavar="ID",
        help="train this community's own adapter on its own feedback (default: the shared one)",
    )
    _add_storage_args(round_, adapters=True)
    sft = train_sub.add_parser(
        "sft", help="adapt a LoRA to a story corpus (domain fine-tuning); registers a candidate"
    )
    sft.add_argument(
        "--corpus",
        type=Path,
        required=True,
        metavar="FILE_OR_DIR",
        help="a UTF-8 text file, or a folder of .txt files; stories separated by <|endoftext|>",
    )
    sft.add_argument("--lr", type=float, default=2e-4, help="learning rate (default: 2e-4)")
    sft.add_argument("--epochs", type=float, default=1.0)
    sft.add_argument("--max-steps", type=int, help="stop after this many steps (big corpora)")
    sft.add_argument("--max-length", type=int, default=256, help="tokens per training window")
    sft.add_argument("--batch-size", type=int, default=8)
    sft.add_argument(
        "--from-promoted",
        action="store_true",
        help="start from the promoted adapter (default: a fresh LoRA)",
    )
    sft.add_argument(
        "--promote",
        action="store_true",
        help="serve the new adapter if its held-out corpus perplexity improved",
    )
    _add_storage_args(sft, adapters=True)

    adapters = sub.add_parser("adapters", help="the LoRA adapter registry")
    adapters_sub = adapters.add_subparsers(dest="adapters", required=True, metavar="ACTION")
    adapters_sub.add_parser("list", help="every version with its status and metrics")
    promote = adapters_sub.add_parser("promote", help="serve VERSION from now on")
    promote.add_argument("version", type=int, metavar="VERSION")
    adapters_sub.add_parser("rollback", help="go back to the version served before")
    compare = adapters_sub.add_parser(
        "compare",
        help="continuations of the same prompts by A and B side by side, with reward scores",
    )
    compare.add_argument("a", metavar="A", help="an adapter version, or base")
    compare.add_argument("b", metavar="B", help="an adapter version, or base")
    compare.add_argument(
        "--prompts", type=int, default=6, help="held-out story openings to continue (default 6)"
    )
    compare.add_argument(
        "--prompt", action="append", metavar="TEXT", help="a prompt of your own (repeatable)"
    )
    compare.add_argument("--max-new-tokens", type=int, default=64)
    compare.add_argument("--seed", type=int, default=0, help="the same seed for A and B")
    compare.add_argument(
        "--community", help="score with this community's reward model (else the shared one)"
    )
    for action in adapters_sub.choices.values():  # on the actions only: a parent's
        _add_storage_args(action, adapters=True)  # option would be reset by them

    bench = sub.add_parser("bench", help="benchmarks that print figures")
    bench_sub = bench.add_subparsers(dest="bench", required=True, metavar="BENCH")
    serve = bench_sub.add_parser(
        "serve", help="naive sequential generation vs the batching scheduler"
    )
    serve.add_argument(
        "--model",
        choices=["default", "gpt2-config"],
        default="default",
        help="bundled model, or GPT-2 small's architecture with random weights",
    )
    serve.add_argument("--concurrency", type=int, default=16, help="simulated channels")
    serve.add_argument("--requests", type=int, default=64, help="requests in all")
    serve.add_argument("--max-new-tokens", type=int, default=64)
    serve.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    serve.add_argument(
        "--max-batch-size", type=int, help="scheduler batch bound (default: concurrency)"
    )
    serve.add_argument(
        "--best-of",
        type=int,
        default=1,
        choices=range(1, 17),
        metavar="N",
        help="also run the workload with N candidates per sampling request (1..16)",
    )
    serve.add_argument(
        "--remote",
        nargs="?",
        const="local",
        metavar="URL",
        help="also run the workload over HTTP through a completions service: one started "
        "here (no URL), or the one at URL (e.g. http://gpu-box:8000/v1; base model only)",
    )
    serve.add_argument("--json", type=Path, help="also write the figures to this file")
    learning = bench_sub.add_parser(
        "learning", help="simulated audience: rounds of generate, react, train, gate, promote"
    )
    learning.add_argument("--rounds", type=int, default=3)
    learning.add_argument(
        "--taste",
        default="animals",
        help="a shipped taste (animals, cheerful, gloomy, dialogue, short) or "
        "MODULE:FUNCTION(continuation, *, prompt) -> True/False/None",
    )
    learning.add_argument(
        "--communities",
        metavar="TASTE_A,TASTE_B",
        help="several simulated servers, each with its own taste and adapter lineage, "
        "beside a shared-adapter arm (instead of --taste)",
    )
    learning.add_argument(
        "--best-of",
        type=int,
        default=DEFAULT_BEST_OF,
        help="candidates per turn once a reward model is promoted (1: best-of-n off)",
    )
    learning.add_argument("--reactions", type=int, default=200, help="reactions per round")
    learning.add_argument(
        "--openings", type=int, default=2, help="openings shown per prompt (as retries show them)"
    )
    learning.add_argument(
        "--eval-samples", type=int, default=200, help="continuations per approval measurement"
    )
    learning.add_argument("--max-new-tokens", type=int, default=64)
    # auto by default, so the bench measures what the bot's rounds do; lr and epochs:
    # METHOD_DEFAULTS.
    learning.add_argument(
        "--method",
        choices=["auto", "kto", "dpo"],
        default="auto",
        help="auto (as the bot trains): DPO with enough preference pairs, else KTO",
    )
    _add_schedule_args(learning)
    learning.add_argument(
        "--seed", type=int, default=0, help="changes the prompts, the split and the training"
    )
    learning.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    learning.add_argument("--json", type=Path, help="also write the figures to this file")
    soak = bench_sub.add_parser(
        "soak", help="channels telling stories in a closed loop: memory over time"
    )
    soak.add_argument("--minutes", type=float, default=5.0, help="how long the load runs")
    soak.add_argument("--channels", type=int, default=16, help="simulated channels")
    soak.add_argument("--max-new-tokens", type=int, default=48, help="per storyteller turn")
    soak.add_argument("--sample-every", type=float, default=5.0, help="seconds between RSS samples")
    soak.add_argument(
        "--warmup",
        type=float,
        default=0.2,
        help="warm-up lasts at least this fraction of the run (and 30 turns per channel)",
    )
    soak.add_argument("--seed", type=int, default=0, help="changes what the channels do")
    soak.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    soak.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    soak.add_argument(
        "--trace-top",
        type=int,
        default=0,
        metavar="N",
        help="tracemalloc: the N places where Python's allocations grew after warm-up (slow)",
    )
    soak.add_argument("--json", type=Path, help="also write the figures to this file")
    return parser


def _add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        metavar="VERSION|base",
        help="serve this registry version (or the bare base model) instead of the promoted one",
    )


def _add_storage_args(parser: argparse.ArgumentParser, *, adapters: bool = False) -> None:
    parser.add_argument("--db", type=Path, help="SQLite file (default: STORY_DB_PATH)")
    if adapters:
        parser.add_argument(
            "--dir", type=Path, help="adapter directory (default: STORY_ADAPTER_DIR)"
        )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--preset", choices=sorted(PRESETS), help="style preset (default: STORY_PRESET)"
    )
    group.add_argument("--max-new-tokens", type=int)
    group.add_argument("--seed", type=int)
    group.add_argument("--temperature", type=float, help="0 = greedy")
    group.add_argument("--top-p", type=float)
    group.add_argument("--top-k", type=int, help="0 = off")
    group.add_argument("--repetition-penalty", type=float)
    group.add_argument("--no-repeat-ngram-size", type=int)
    group.add_argument("--num-beams", type=int, help="more than 1: beam search instead of sampling")
    group.add_argument("--length-penalty", type=float, help="beam search only")


def _sampling_from_args(args: argparse.Namespace, settings: Settings) -> SamplingParams:
    base = preset(args.preset).params if args.preset else settings.sampling
    fields = (
        "max_new_tokens",
        "seed",
        "temperature",
        "top_p",
        "top_k",
        "repetition_penalty",
        "no_repeat_ngram_size",
        "num_beams",
        "length_penalty",
    )
    return base.replace(**{f: getattr(args, f) for f in fields})


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        settings = Settings.from_env()
        _configure_logging(settings.log_level)
        if getattr(args, "db", None):
            settings = settings.replace(db_path=args.db)
        if getattr(args, "dir", None):
            settings = settings.replace(adapter_dir=args.dir)
        if args.command == "generate":
            return asyncio.run(_generate(args, settings))
        if args.command == "chat":
            return asyncio.run(_chat(args, settings))
        if args.command == "serve":
            return asyncio.run(_serve(args, settings))
        if args.command == "db":
            return asyncio.run(_db(args, settings))
        if args.command == "train" and args.train == "sft":
            return asyncio.run(_train_sft(args, settings))
        if args.command == "train":
            return asyncio.run(_train_round(args, settings))
        if args.command == "adapters":
            return asyncio.run(_adapters(args, settings))
        if args.command == "feedback" and args.feedback == "import":
            return asyncio.run(_feedback_import(args, settings))
        if args.command == "feedback" and args.feedback == "stats":
            return asyncio.run(_feedback_stats(args, settings))
        if args.command == "feedback":
            return asyncio.run(_feedback_export(args, settings))
        if args.command == "bench":
            return asyncio.run(_bench(args))
    except StoryError as exc:  # ConfigError included: one line, no traceback
        print(f"storyengine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    return 2


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # libraries' deprecation notices are not for the user
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if resolve_mode() != "bar":  # download bars only where someone watches them
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")


def _say_loading(settings: Settings) -> None:
    """A model from the Hugging Face hub may be downloaded first: say so (in a terminal
    the download shows its own bars)."""
    if not settings.uses_bundled_model:
        print(
            f"loading {settings.base_model} (the first time, it is downloaded from the"
            " Hugging Face hub: this can take minutes)",
            file=sys.stderr,
            flush=True,
        )


def _load_generator(settings: Settings) -> Any:
    from ..serving.generators import make_generator

    _say_loading(settings)
    return make_generator(settings)


async def _generate(args: argparse.Namespace, settings: Settings) -> int:
    from ..safety import SafetyFilter
    from ..story.narrator import Narrator

    params = _sampling_from_args(args, settings)
    adapter = await _registry_adapter(settings, args.adapter)
    generator = _load_generator(settings)
    if adapter is not None:
        await generator.use_adapter(*adapter)
    model = generator.info
    safety = SafetyFilter(
        max_input_chars=max(settings.max_input_chars, len(args.prompt)),
        special_tokens=model.special_tokens,
        blocklist=settings.blocklist,
    )
    prompt = safety.clean_input(args.prompt, what="The prompt")
    ids = model.encode(prompt)
    room = model.context_window - params.max_new_tokens
    if len(ids) > room:  # keep the end of an overlong prompt: it is what gets continued
        prompt = model.decode(ids[-room:])
    try:
        narration = await Narrator(generator, safety).narrate(prompt, params)
    finally:
        await generator.close()
    print(narration.text)
    return 0


async def _serve(args: argparse.Namespace, settings: Settings) -> int:
    """`storyengine serve`: until Ctrl-C or SIGTERM. With a database, adapter versions
    can be named and the promoted one is served by default."""
    import signal

    from ..learning.registry import AdapterRegistry
    from ..serving.service import CompletionService, serve
    from ..storage.store import Store

    if not 0 <= args.port <= 65535:
        raise InvalidInput(f"--port must be 0..65535, got {args.port}")
    generator = await asyncio.to_thread(_load_generator, settings)
    store = None
    try:
        registry = None
        if settings.db_path.exists():  # never create a database here
            store = await Store(settings.db_path).open()
            registry = AdapterRegistry(store, settings.adapter_dir)
        service = CompletionService(generator, defaults=settings.sampling, registry=registry)
        await service.sync_promoted()

        def ready(port: int) -> None:
            print(
                f"serving {service.model_id} on http://{args.host}:{port}/v1 (Ctrl-C stops)",
                file=sys.stderr,
                flush=True,
            )

        task = asyncio.ensure_future(serve(service, args.host, args.port, ready=ready))
        asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, task.cancel)
        try:
            await task
        except asyncio.CancelledError:
            pass
        except OSError as exc:  # the port is taken, the address is not this machine's
            where = f"{args.host}:{args.port}"
            raise InvalidInput(f"cannot listen on {where}: {exc.strerror}") from None
    finally:
        await generator.close()
        if store is not None:
            await store.close()
    return 0


async def _registry_adapter(
    settings: Settings, wanted: str | None
) -> tuple[str, str | None] | None:
    """What `generate` serves: the registry's promoted adapter (as the bot would), or
    `--adapter VERSION|base`. None: no registry here, the model as configured."""
    from ..serving.generation import BASE_ADAPTER

    if wanted is not None and wanted.strip().lower() == "base":
        return (BASE_ADAPTER, None)
    if not settings.db_path.exists():  # nothing registered; never create a database here
        if wanted is not None:
            raise InvalidInput(f"{settings.db_path} does not exist: no adapter {wanted} in it.")
        return None
    from ..learning.registry import AdapterRegistry
    from ..storage.store import Store

    store = await Store(settings.db_path).open()
    try:
        registry = AdapterRegistry(store, settings.adapter_dir)
        if wanted is None:
            version = await registry.promoted()
        else:
            number = wanted.strip().lower().removeprefix("v")
            if not number.isdigit():
                raise InvalidInput(f"--adapter wants a version number or base, got {wanted!r}")
            version = await registry.get(int(number))
            if version is None:
                raise InvalidInput(f"There is no adapter version {number}.")
    finally:
        await store.close()
    return (version.name, str(version.path)) if version is not None else None


async def _bench(args: argparse.Namespace) -> int:
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


async def _train_sft(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.scheduling import watch_parent
    from ..learning.sft import CorpusTrainConfig, run_sft

    watch_parent()  # started by a bot: end with it

    config = CorpusTrainConfig(
        learning_rate=args.lr,
        epochs=args.epochs,
        max_steps=args.max_steps,
        max_length=args.max_length,
        batch_size=args.batch_size,
        from_promoted=args.from_promoted,
        promote=args.promote,
    )
    _say_loading(settings)
    version, promoted, report = await run_sft(settings, args.corpus, config, say=echo)
    if promoted:
        print(f"promoted v{version}")
    elif report["passed"]:
        print(f"registered v{version} as a candidate: `storyengine adapters promote {version}`")
    else:
        print(f"registered v{version} as a candidate: {'; '.join(report['reasons'])}")
    return 0


async def _train_round(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.rounds import RoundConfig, run_round
    from ..learning.scheduling import watch_parent
    from ..learning.training import TrainConfig

    watch_parent()  # started by a bot: end with it
    try:
        train = TrainConfig(
            learning_rate=args.lr, epochs=args.epochs, min_examples=args.min_examples
        )
    except ValueError as exc:
        raise InvalidInput(str(exc)) from None
    result = await run_round(
        settings,
        RoundConfig(method=args.method, train=train, community=args.community),
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


async def _adapters(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.registry import AdapterRegistry
    from ..storage.store import Store

    if args.adapters == "compare":  # reads only: never creates a database
        return await _compare(args, settings)

    store = await Store(settings.db_path).open()
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


async def _compare(args: argparse.Namespace, settings: Settings) -> int:
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


async def _feedback_import(args: argparse.Namespace, settings: Settings) -> int:
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
    store = await Store(settings.db_path).open()
    try:
        counts = await store.import_feedback(rows, uuid.uuid4().hex[:8])
    finally:
        await store.close()
    print(
        f"imported {counts['pairs']} preference pairs and {counts['labels']} labelled "
        f"examples ({counts['stories']} stories) into {settings.db_path}"
    )
    return 0


async def _feedback_export(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from ..learning.datasets import build_datasets
    from ..storage.store import Store

    store = await Store(settings.db_path).open()
    try:
        datasets = await build_datasets(store)
    finally:
        await store.close()
    lines = "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in datasets.rows())
    if args.out:
        await asyncio.to_thread(_write_text, str(args.out), lines)
    else:
        sys.stdout.write(lines)
    print(
        f"{len(datasets.pairs)} preference pairs, {len(datasets.examples)} labelled examples",
        file=sys.stderr,
    )
    return 0


async def _feedback_stats(args: argparse.Namespace, settings: Settings) -> int:
    from ..learning.stats import feedback_summary, render_chart, summary_lines
    from ..storage.store import Store

    store = await Store(settings.db_path).open(create=False)
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


async def _db(args: argparse.Namespace, settings: Settings) -> int:
    from ..storage.store import Store, backup_database

    if args.action == "backup":
        if args.file is None:
            raise InvalidInput("db backup needs a FILE to write the backup to")
        await asyncio.to_thread(backup_database, settings.db_path, args.file)
        print(f"backed up {settings.db_path} to {args.file}")
        return 0
    if args.file is not None:
        raise InvalidInput(f"db {args.action} takes no FILE")
    # `status` looks, and never creates a database where there was none.
    store = await Store(settings.db_path).open(migrate=False, create=args.action != "status")
    try:
        if args.action == "migrate":
            applied = await store.migrate()
            for m in applied:
                print(f"applied {m.version:04d}_{m.name}")
            if not applied:
                print(f"{settings.db_path}: up to date")
        for status in await store.migration_status():
            state = f"applied {status.applied_at}" if status.applied_at else "pending"
            print(f"{status.version:04d}_{status.name}: {state}")
    finally:
        await store.close()
    return 0


class _Printer:
    """Prints a turn as it grows; the final text may revise the last sentence."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.shown = ""

    async def progress(self, text: str) -> None:
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :])
            self.out.flush()
            self.shown = text

    def finish(self, text: str) -> None:
        if text.startswith(self.shown):
            self.out.write(text[len(self.shown) :] + "\n\n")
        else:
            self.out.write(f"\n(revised)\n{text}\n\n")
        self.out.flush()
        self.shown = ""


async def _chat(args: argparse.Namespace, settings: Settings) -> int:
    from ..story.engine import StoryEngine

    out = sys.stdout
    interactive = sys.stdin.isatty()
    channel, author = args.channel, Author(id=f"terminal:{args.author}", name=args.author)
    print("Loading the storyteller…", file=sys.stderr)
    _say_loading(settings)
    engine = await StoryEngine(settings, adapter=args.adapter).start()
    loop = asyncio.get_running_loop()
    if interactive:
        loop.add_signal_handler(signal.SIGINT, lambda: engine.stop(channel) or _quit())
    try:
        story = await engine.find_story(channel)
        if story is None:
            out.write(
                f"No story in '{channel}' yet. Type /start PREMISE to begin, /help for help.\n"
            )
        else:
            view = await engine.view(channel)
            out.write(f"Resuming the story in '{channel}' ({len(view.turns)} turns).\n")
            out.write((view.turns[-1].text if view.turns else story.premise) + "\n\n")
        out.flush()
        session = _ChatSession(engine, channel, author, out)
        while True:
            if interactive:
                out.write("> ")
                out.flush()
            line = await asyncio.to_thread(sys.stdin.readline)
            if not line:
                break
            line = line.strip()
            if not line:
                continue
            try:
                if not await session.handle(line):
                    break
            except StoryError as exc:
                out.write(f"! {exc}\n")
                out.flush()
    finally:
        await engine.close()
    return 0


def _read_file(path: str, kind: str) -> bytes:
    """A story file or a lorebook from disk, size-checked before it is read."""
    from .. import saves
    from ..story import lorebooks

    most = saves.MAX_BYTES if kind == "story" else lorebooks.MAX_BYTES
    try:
        if os.path.getsize(path) > most:
            raise InvalidInput(f"{path} is too large: a {kind} file is at most {most:,} bytes.")
        with open(path, "rb") as file:
            return file.read()
    except OSError as exc:
        raise InvalidInput(f"Cannot read {path}: {exc.strerror}.") from None


def _write_text(path: str, text: str) -> None:
    Path(path).expanduser().write_text(text, encoding="utf-8")


def _quit() -> None:
    raise KeyboardInterrupt


class _ChatSession:
    """Turns chat lines into engine calls and prints the results."""

    def __init__(self, engine: Any, channel: str, author: Author, out: TextIO) -> None:
        self.engine = engine
        self.channel = channel
        self.author = author
        self.draft: Any = None
        """The last card `/character` or `/setting` drafted, for `/keep`."""
        self.out = out
        self.printer = _Printer(out)

    def say(self, text: str) -> None:
        self.out.write(text + "\n")
        self.out.flush()

    async def handle(self, line: str) -> bool:
        """Handle one line. Returns False to end the session."""
        e, ch = self.engine, self.channel
        if not line.startswith("/"):
            line = "/continue " + line
        command, _, arg = line[1:].partition(" ")
        command, arg = command.lower(), arg.strip()
        p = self.printer.progress
        if command in {"quit", "exit", "q"}:
            return False
        if command == "help":
            self.say(CHAT_HELP)
        elif command == "start":
            if not arg:
                self.say("! Give a premise: /start Once upon a time, a little fox...")
                return True
            self.say(arg)
            result = await e.start_story(ch, arg, author=self.author, on_progress=p)
            self.printer.finish(result.text)
        elif command == "continue":
            result = await e.continue_story(ch, self.author, arg or None, on_progress=p)
            self.printer.finish(result.text)
        elif command == "retry":
            result = await e.retry(ch, by=self.author, on_progress=p)
            self.printer.finish(result.text)
        elif command == "alts":
            alts = await e.alternatives(ch)
            if not alts:
                self.say("No alternatives yet: /retry writes one.")
            for i, turn in enumerate(alts, 1):
                mark = "*" if turn.status == "active" else " "
                self.say(f"{mark}{i}. {turn.text}")
        elif command == "swipe":
            if arg not in ("", "prev", "next"):
                raise InvalidInput("Usage: /swipe [prev|next]")
            view = await e.view(ch)  # the engine says whether the last turn swipes
            position = view.turns[-1].position if view.turns else 0
            step = 1 if arg == "next" else -1
            swipe = await e.swipe(ch, view.story.id, position, step, by=self.author)
            self.say(f"({swipe.number}/{swipe.total}) {swipe.text}")
        elif command == "pick":
            if not arg.isdigit():
                self.say("! Usage: /pick N (see /alts)")
                return True
            turn = await e.choose_alternative(ch, int(arg), by=self.author)
            self.say(turn.text)
        elif command in ("good", "bad"):
            await e.rate(ch, self.author, liked=command == "good")
            self.say("Noted: 👍." if command == "good" else "Noted: 👎.")
        elif command == "undo":
            removed = await e.undo(ch)
            self.say(f"Undone: {len(removed)} turn(s).")
        elif command == "memory":
            await e.set_memory(ch, arg)
            self.say("Memory set." if arg else "Memory cleared.")
        elif command == "note":
            await e.set_authors_note(ch, arg)
            self.say("Author's note set." if arg else "Author's note cleared.")
        elif command == "lore":
            await self._lore(arg)
        elif command == "unlore":
            await e.remove_lore(ch, arg)
            self.say(f"Removed lore card {arg}.")
        elif command == "settings":
            await self._settings(arg)
        elif command == "recap":
            self.say(await e.recap(ch))
        elif command == "context":
            self.say((await e.context(ch)).describe())
        elif command == "export":
            markdown = await e.export_markdown(ch)
            if arg:
                await asyncio.to_thread(_write_text, arg, markdown)
                self.say(f"Exported to {arg}.")
            else:
                self.say(markdown)
        elif command in ("character", "setting"):
            name, _, hint = arg.partition(" ") if command == "character" else ("", "", arg)
            self.draft = await e.draft_card(ch, command, name=name or None, hint=hint or None)
            self.say(f"{self.draft.name}: {self.draft.text}\n(/keep adds it to the lore)")
        elif command == "keep":
            if self.draft is None:
                raise InvalidInput("Nothing to keep: /character or /setting drafts a card.")
            card = await e.add_lore(
                ch, self.draft.name, self.draft.triggers, self.draft.text, by=self.author
            )
            self.draft = None
            self.say(f"Kept lore card {card.name}.")
        elif command == "import":
            if not arg:
                raise InvalidInput("Usage: /import FILE")
            raw = await asyncio.to_thread(_read_file, arg, "lorebook")
            self.say((await e.import_lore(ch, raw, by=self.author)).describe())
        elif command == "export-lore":
            if not arg:
                raise InvalidInput("Usage: /export-lore FILE")
            await asyncio.to_thread(_write_text, arg, await e.lore_as_world_info(ch))
            self.say(f"Exported the lore to {arg}.")
        elif command == "save":
            if not arg:
                raise InvalidInput("Usage: /save FILE")
            await asyncio.to_thread(_write_text, arg, await e.save_story(ch))
            self.say(f"Saved to {arg}.")
        elif command == "load":
            if not arg:
                raise InvalidInput("Usage: /load FILE")
            raw = await asyncio.to_thread(_read_file, arg, "story")
            view = await e.load_story(ch, raw, author=self.author)
            self.say(f'Loaded the story "{view.story.premise}" ({len(view.turns)} turns).')
            if view.turns:
                self.say(view.turns[-1].text)
        elif command == "end":
            story = await e.end_story(ch)
            self.say(
                f"The story has ended. (/export still works; /start begins a new one.) [{story.id}]"
            )
        else:
            self.say(f"! Unknown command /{command}. Type /help.")
        return True

    async def _lore(self, arg: str) -> None:
        if not arg:
            cards = await self.engine.lore(self.channel)
            if not cards:
                self.say("No lore cards. Add one: /lore Pip: pip, mouse: A brave little mouse.")
            for card in cards:
                self.say(f"{card.name} ({', '.join(card.triggers)}): {card.text}")
            return
        parts = [p.strip() for p in arg.split(":", 2)]
        if len(parts) != 3:
            self.say("! Usage: /lore NAME: TRIGGER, TRIGGER: TEXT")
            return
        card = await self.engine.add_lore(self.channel, parts[0], parts[1], parts[2])
        self.say(f"Lore card {card.name} saved (triggers: {', '.join(card.triggers)}).")

    async def _settings(self, arg: str) -> None:
        changes: dict[str, Any] = {}
        names = {
            "preset": ("preset_name", str),
            "temperature": ("temperature", float),
            "length": ("max_new_tokens", int),
            "best_of": ("best_of", int),
        }
        for pair in arg.split():
            key, _, value = pair.partition("=")
            if key not in names or not value:
                self.say("! Usage: /settings [preset=NAME] [temperature=T] [length=N] [best_of=N]")
                return
            try:
                changes[names[key][0]] = names[key][1](value)
            except ValueError:
                self.say(f"! {key} must be a number.")
                return
        params = (
            await self.engine.configure_channel(self.channel, **changes)
            if changes
            else (await self.engine.sampling_for(self.channel))
        )
        self.say(
            f"temperature={params.temperature} top_p={params.top_p} top_k={params.top_k} "
            f"length={params.max_new_tokens} beams={params.num_beams} best_of={params.best_of}"
        )
