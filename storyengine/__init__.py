"""Taleweaver's story engine: stories told with people, remembered per channel.

Importing the package is cheap: the model stack (torch, transformers) loads only when
an engine starts or a model is loaded.
"""

from .config import Settings
from .errors import (
    ConfigError,
    GenerationCancelled,
    GenerationFailed,
    InvalidInput,
    NoActiveStory,
    NothingToRetry,
    NothingToUndo,
    StoryAlreadyRunning,
    StoryError,
)
from .records import Author, Story, Turn, TurnResult
from .sampling import PRESETS, SamplingParams
from .version import __version__

__all__ = [
    "PRESETS",
    "Author",
    "ConfigError",
    "GenerationCancelled",
    "GenerationFailed",
    "InvalidInput",
    "NoActiveStory",
    "NothingToRetry",
    "NothingToUndo",
    "SamplingParams",
    "Settings",
    "Story",
    "StoryAlreadyRunning",
    "StoryEngine",
    "StoryError",
    "Turn",
    "TurnResult",
    "__version__",
]


def __getattr__(name: str) -> object:
    # StoryEngine pulls in aiosqlite; load it on first use, not on import.
    if name == "StoryEngine":
        from .engine import StoryEngine

        return StoryEngine
    raise AttributeError(name)
