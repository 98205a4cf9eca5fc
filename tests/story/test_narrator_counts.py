"""The narrator counts how continuations end (what the bot's /metrics reports as
`taleweaver_generations_total{outcome}`): finished, cancelled, failed."""

from __future__ import annotations

import pytest

from storyengine.errors import GenerationCancelled, GenerationFailed
from storyengine.safety import SafetyFilter
from storyengine.sampling import SamplingParams
from storyengine.serving.generation import SequentialGenerator
from storyengine.story.narrator import Narrator


async def test_outcomes_are_counted(tiny_model):
    generator = SequentialGenerator(tiny_model)
    narrator = Narrator(generator, SafetyFilter())
    params = SamplingParams(max_new_tokens=12, seed=1)
    try:
        for _ in range(2):
            try:
                await narrator.narrate("Once upon a time", params)
            except GenerationFailed:  # a random tiny model may write no sentence
                pass
        with pytest.raises(GenerationCancelled):
            await narrator.narrate(
                "Once upon a time", params, on_handle=lambda handle: handle.cancel()
            )
    finally:
        await generator.close()
    assert narrator.outcomes.get("cancelled") == 1
    finished = {k: v for k, v in narrator.outcomes.items() if k != "cancelled"}
    assert set(finished) <= {"eos", "length", "failed"} and sum(finished.values()) == 2
