"""What several commands share: saying a model is loading, reading and writing files."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from ..config import Settings
from ..errors import InvalidInput


def say_loading(settings: Settings) -> None:
    """A model from the Hugging Face hub may be downloaded first: say so (in a terminal
    the download shows its own bars)."""
    if not settings.uses_bundled_model:
        print(
            f"loading {settings.base_model} (the first time, it is downloaded from the"
            " Hugging Face hub: this can take minutes)",
            file=sys.stderr,
            flush=True,
        )


def read_file(path: str, kind: str) -> bytes:
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


def write_text(path: str, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_bytes(path: str, data: bytes) -> None:
    """Write a file the user named, or say (as `InvalidInput`) why it cannot be."""
    try:
        Path(path).expanduser().write_bytes(data)
    except OSError as exc:
        raise InvalidInput(f"Cannot write {path}: {exc.strerror}.") from None
