"""`storyengine`: the terminal storyteller and the engine's admin commands.

storyengine generate "Once upon a time, a little fox" --seed 1
storyengine chat --db stories.db --channel kitchen-table
storyengine db migrate | status | backup FILE
storyengine feedback stats --png chart.png
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import warnings
from collections.abc import Callable, Coroutine, Sequence
from pathlib import Path
from typing import Any

from ..config import Settings
from ..errors import StoryError
from ..progress import resolve_mode
from . import bench, chat, db, learning, models
from .parser import build_parser

Command = Callable[..., Coroutine[Any, Any, int]]
COMMANDS: dict[tuple[str, str | None], Command] = {
    ("generate", None): models.run_generate,
    ("serve", None): models.run_serve,
    ("chat", None): chat.run_chat,
    ("db", None): db.run_db,
    ("train", "sft"): learning.run_train_sft,
    ("train", "round"): learning.run_train_round,
    ("train", "worker"): learning.run_train_worker,
    ("adapters", None): learning.run_adapters,
    ("feedback", "import"): learning.run_feedback_import,
    ("feedback", "export"): learning.run_feedback_export,
    ("feedback", "stats"): learning.run_feedback_stats,
    ("bench", None): bench.run_bench,
}
"""Each command (and subcommand where they differ) and what runs it (cli/<module>.py)."""


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    action = getattr(args, args.command, None)  # train round|sft, feedback export|...
    run = COMMANDS.get((args.command, None)) or COMMANDS[(args.command, action)]
    try:
        settings = Settings.from_env()
        _configure_logging(settings.log_level)
        if getattr(args, "db", None):
            db = str(args.db)
            where = {"db_url": db} if db.startswith(("postgresql://", "postgres://")) else {}
            settings = settings.replace(**where or {"db_path": Path(db), "db_url": None})
        if getattr(args, "dir", None):
            settings = settings.replace(adapter_dir=args.dir)
        return asyncio.run(run(args, settings))
    except StoryError as exc:  # ConfigError included: one line, no traceback
        print(f"storyengine: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _configure_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if level != "DEBUG":  # libraries' deprecation notices are not for the user
        warnings.filterwarnings("ignore", category=FutureWarning)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
    if resolve_mode() != "bar":  # download bars only where someone watches them
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
