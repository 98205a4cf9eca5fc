"""Which generator runs the model: made from the settings, not inside the engine.

`STORY_GENERATOR` names one: `batching` (the default: the continuous-batching scheduler,
many channels decoded together) or `sequential` (one request at a time with
transformers' `generate`: simple, slower, and what beam search uses). Both run the model
in this process. `STORY_GENERATOR_URL` names a service that runs it elsewhere
(`remote.RemoteGenerator`); any other generator implements `generation.Generator` with
its own `ModelInfo` and is handed to `StoryEngine(generator=...)`.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from ..config import Settings
    from .generation import Generator

GENERATORS = ("batching", "sequential")


def make_generator(settings: Settings) -> Generator:
    """The generator `settings.generator` names, its model loaded. Blocking (seconds, a
    download on first use of a Hugging Face id): call it off the event loop."""
    if settings.generator_url:
        from .remote import connect

        return connect(settings)
    from .modeling import load_model

    model = load_model(settings)
    if settings.generator == "sequential":
        from .generation import SequentialGenerator

        return SequentialGenerator(model, max_loaded_adapters=settings.max_loaded_adapters)
    from .scheduler import BatchingGenerator, SchedulerConfig

    return BatchingGenerator(
        model,
        SchedulerConfig(
            max_batch_size=settings.max_batch_size,
            max_tokens_in_flight=settings.max_tokens_in_flight,
            max_loaded_adapters=settings.max_loaded_adapters,
        ),
    )
