"""The installed package's version (`taleweaver` in pyproject.toml), for `--version`,
the bot's start-up line and the metrics."""

from __future__ import annotations

from importlib import metadata

DISTRIBUTION = "taleweaver"


def package_version() -> str:
    try:
        return metadata.version(DISTRIBUTION)
    except metadata.PackageNotFoundError:  # run from a source tree that is not installed
        return "unknown"


__version__ = package_version()
