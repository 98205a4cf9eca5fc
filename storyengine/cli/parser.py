"""The `storyengine` command line's options: one parser, every option with help."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..bench.configs import (
    LearningBenchConfig,
    ServeBenchConfig,
    SoakConfig,
    StoreBenchConfig,
)
from ..config import Settings
from ..learning.rounds import RoundConfig
from ..learning.sft import CorpusTrainConfig
from ..learning.training import TrainConfig
from ..options import add_options
from ..sampling import PRESETS, SamplingParams, preset
from ..version import __version__

log = logging.getLogger(__name__)


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
    service.add_argument(
        "--ray",
        action="store_true",
        help="run it as a Ray Serve deployment: replicas each with the model, adapters "
        "routed to the replicas that hold them (pip install 'taleweaver[ray]')",
    )
    service.add_argument(
        "--replicas", type=int, default=2, help="--ray: replicas to start (default 2)"
    )
    service.add_argument(
        "--max-replicas",
        type=int,
        help="--ray: autoscale up to this many replicas on requests in flight",
    )
    service.add_argument(
        "--target-requests",
        type=float,
        default=8.0,
        help="--ray: requests in flight per replica that autoscaling aims for (default 8)",
    )
    _add_storage_args(service, adapters=True)

    db = sub.add_parser(
        "db",
        help="the database: migrate, status, backup FILE (safe while the bot runs), "
        "or copy --to URL (into PostgreSQL)",
    )
    db.add_argument("action", choices=["migrate", "status", "backup", "copy"])
    db.add_argument(
        "--to",
        metavar="URL|FILE",
        help="copy: the database to copy into (postgresql://..., new or empty)",
    )
    db.add_argument("file", nargs="?", type=Path, metavar="FILE", help="backup: where to write")
    _add_storage_args(db)
    feedback = sub.add_parser("feedback", help="training data made from the audience's feedback")
    feedback_sub = feedback.add_subparsers(dest="feedback", required=True, metavar="ACTION")
    export = feedback_sub.add_parser("export", help="write preference pairs and labelled examples")
    export.add_argument("--format", choices=["jsonl"], default="jsonl", help="file format")
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
    add_options(round_, RoundConfig)
    add_options(round_, TrainConfig)
    _add_storage_args(round_, adapters=True)
    worker = train_sub.add_parser(
        "worker",
        help="run the rounds that bots with TRAIN_MODE=external record in the shared database",
    )
    worker.add_argument("--once", action="store_true", help="take one request (or none), then end")
    worker.add_argument(
        "--poll", type=float, default=30.0, help="seconds between looks for a request (default 30)"
    )
    worker.add_argument(
        "--lease",
        type=float,
        default=600.0,
        help="a worker renews its request every third of this many seconds while it runs; "
        "a request not renewed for this long (its worker died) is taken again (default 600)",
    )
    add_options(worker, RoundConfig, skip=("community",))
    add_options(worker, TrainConfig)
    _add_storage_args(worker, adapters=True)
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
    add_options(sft, CorpusTrainConfig)
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
    compare.add_argument(
        "--max-new-tokens", type=int, default=64, help="tokens per continuation (default 64)"
    )
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
    add_options(serve, ServeBenchConfig)
    _add_device_arg(serve)
    serve.add_argument(
        "--remote",
        nargs="?",
        const="local",
        metavar="URL",
        help="also run the workload over HTTP through a completions service: one started "
        "here (no URL), or the one at URL (e.g. http://gpu-box:8000/v1; base model only)",
    )
    _add_json_arg(serve)
    learning = bench_sub.add_parser(
        "learning", help="simulated audience: rounds of generate, react, train, gate, promote"
    )
    add_options(learning, LearningBenchConfig)
    learning.add_argument(
        "--taste",
        default="animals",
        help="a shipped taste (animals, cheerful, gloomy, dialogue, short) or "
        "MODULE:FUNCTION(continuation, *, prompt) -> True/False/None",
    )
    _add_device_arg(learning)
    _add_json_arg(learning)
    soak = bench_sub.add_parser(
        "soak", help="channels telling stories in a closed loop: memory over time"
    )
    add_options(soak, SoakConfig)
    _add_device_arg(soak)
    soak.add_argument("--db", type=Path, help="SQLite file (default: a temporary one)")
    _add_json_arg(soak)
    store = bench_sub.add_parser(
        "store",
        help="writer processes on one database at once: events/s, latency, nothing lost",
    )
    add_options(store, StoreBenchConfig)
    _add_json_arg(store)
    return parser


def _add_device_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="where the model runs"
    )


def _add_json_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", type=Path, help="also write the figures to this file")


def _add_adapter_arg(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--adapter",
        metavar="VERSION|base",
        help="serve this registry version (or the bare base model) instead of the promoted one",
    )


def _add_storage_args(parser: argparse.ArgumentParser, *, adapters: bool = False) -> None:
    parser.add_argument(
        "--db",
        metavar="FILE|URL",
        help="SQLite file or postgresql:// URL (default: STORY_DB_URL, else STORY_DB_PATH)",
    )
    if adapters:
        parser.add_argument(
            "--dir", type=Path, help="adapter directory (default: STORY_ADAPTER_DIR)"
        )


def _add_sampling_args(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("sampling")
    group.add_argument(
        "--preset", choices=sorted(PRESETS), help="style preset (default: STORY_PRESET)"
    )
    group.add_argument("--max-new-tokens", type=int, help="length of the continuation in tokens")
    group.add_argument("--seed", type=int, help="the same seed gives the same continuation")
    group.add_argument("--temperature", type=float, help="0 = greedy")
    group.add_argument("--top-p", type=float, help="nucleus sampling: keep this much probability")
    group.add_argument("--top-k", type=int, help="0 = off")
    group.add_argument("--repetition-penalty", type=float, help="1 = off; above 1 repeats less")
    group.add_argument("--no-repeat-ngram-size", type=int, help="never repeat an n-gram this long")
    group.add_argument("--num-beams", type=int, help="more than 1: beam search instead of sampling")
    group.add_argument("--length-penalty", type=float, help="beam search only")


def sampling_from_args(args: argparse.Namespace, settings: Settings) -> SamplingParams:
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
