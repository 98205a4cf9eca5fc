"""The `storyengine` command line's options: one parser, every option with help."""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from ..config import DEFAULT_BEST_OF, Settings
from ..learning.training import METHOD_DEFAULTS, TrainConfig
from ..sampling import PRESETS, SamplingParams, preset
from ..version import __version__

log = logging.getLogger(__name__)


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
