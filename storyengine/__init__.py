"""Taleweaver's story engine: stories told with people, remembered per channel.

Importing the package is cheap: the model stack (torch, transformers) loads only when
an engine starts or a model is loaded.
"""

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import types
import warnings
from typing import TYPE_CHECKING

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
from .records import Author, LoreCard, Story, Turn, TurnResult
from .sampling import MAX_BEST_OF, PRESETS, SamplingParams
from .saves import MAX_BYTES as MAX_SAVE_BYTES
from .version import __version__

if TYPE_CHECKING:  # loaded on first use (`__getattr__`)
    from .learning.scheduling import TrainingJob, TrainingSchedule
    from .learning.stats import render_chart, summary_lines
    from .story.engine import StoryEngine, StoryView
    from .story.lorebooks import MAX_BYTES as MAX_LOREBOOK_BYTES
    from .story.permissions import Action

__all__ = [
    "MAX_BEST_OF",
    "MAX_LOREBOOK_BYTES",
    "MAX_SAVE_BYTES",
    "PRESETS",
    "Action",
    "Author",
    "ConfigError",
    "GenerationCancelled",
    "GenerationFailed",
    "InvalidInput",
    "LoreCard",
    "NoActiveStory",
    "NothingToRetry",
    "NothingToUndo",
    "SamplingParams",
    "Settings",
    "Story",
    "StoryAlreadyRunning",
    "StoryEngine",
    "StoryError",
    "StoryView",
    "TrainingJob",
    "TrainingSchedule",
    "Turn",
    "TurnResult",
    "__version__",
    "render_chart",
    "summary_lines",
]


_LAZY = {
    "StoryEngine": "story.engine",
    "StoryView": "story.engine",
    "Action": "story.permissions",
    "TrainingJob": "learning.scheduling",
    "TrainingSchedule": "learning.scheduling",
    "render_chart": "learning.stats",
    "summary_lines": "learning.stats",
    "MAX_LOREBOOK_BYTES": "story.lorebooks",
}
"""Public names whose modules pull in more (aiosqlite, matplotlib): loaded on first use."""


def __getattr__(name: str) -> object:
    if name in _LAZY:
        module = importlib.import_module(f"{__name__}.{_LAZY[name]}")
        return getattr(module, "MAX_BYTES" if name == "MAX_LOREBOOK_BYTES" else name)
    raise AttributeError(name)


_FORMER_MODULES = {
    # serving
    "generation": "serving.generation",
    "generators": "serving.generators",
    "scheduler": "serving.scheduler",
    "kvcache": "serving.kvcache",
    "gpt2_decode": "serving.gpt2_decode",
    "grouped_attention": "serving.grouped_attention",
    "multilora": "serving.multilora",
    "modeling": "serving.modeling",
    "remote": "serving.remote",
    "serve": "serving.service",
    # storage
    "store": "storage.store",
    # learning
    "adapters": "learning.registry",
    "feedback": "learning.datasets",
    "training": "learning.training",
    "sft": "learning.sft",
    "reward": "learning.reward",
    "evaluation": "learning.evaluation",
    "rounds": "learning.rounds",
    "training_scheduler": "learning.scheduling",
    "learning_admin": "learning.admin",
    "best_of": "learning.best_of",
    "audience": "learning.audience",
    "compare": "learning.compare",
    "stats": "learning.stats",
    # story
    "engine": "story.engine",
    "memory": "story.memory",
    "narrator": "story.narrator",
    "permissions": "story.permissions",
    "lorebooks": "story.lorebooks",
    "render": "story.render",
    "reactions": "story.reactions",
    # bench
    "bench": "bench.serve",
    "bench_learning": "bench.learning",
    "bench_soak": "bench.soak",
}
"""Where each module of the flat 0.1 layout went: `import storyengine.store` still works
(with a DeprecationWarning) and gives the module at its new place."""


class _FormerModule(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, fullname: str, path: object, target: object = None):
        old = fullname.removeprefix(f"{__name__}.")
        if old != fullname and old in _FORMER_MODULES:
            return importlib.util.spec_from_loader(fullname, self)
        return None

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> None:
        return None

    def exec_module(self, module: types.ModuleType) -> None:
        old = module.__name__.removeprefix(f"{__name__}.")
        new = f"{__name__}.{_FORMER_MODULES[old]}"
        warnings.warn(f"{module.__name__} moved to {new}", DeprecationWarning, stacklevel=2)
        # The import system hands back whatever sys.modules holds once this returns.
        sys.modules[module.__name__] = importlib.import_module(new)


sys.meta_path.append(_FormerModule())
