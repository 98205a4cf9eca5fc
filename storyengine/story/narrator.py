"""From prompt text to a clean continuation: generation plus the rules every output obeys.

A continuation ends at a sentence boundary (never mid-word), holds no end-of-text token,
does not echo the user's line back, and passes the safety filter. The narrator knows
nothing about stories or storage; the engine and `storyengine generate` both use it.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TypedDict, Unpack

from ..errors import GenerationCancelled, GenerationFailed
from ..safety import SafetyFilter
from ..sampling import SamplingParams
from ..serving.generation import (
    GenerationHandle,
    GenerationOutput,
    GenerationRequest,
    Generator,
    ModelInfo,
)
from ..serving.modeling import LoadedModel

ProgressCallback = Callable[[str], Awaitable[None]]
OnHandle = Callable[[object], None]

MIN_NEW_TOKENS = 8
"""Keeps the model from ending the story on its very first token."""


class NarrateOptions(TypedDict, total=False):
    """`narrate`'s keyword options: `narrate_candidates`'s, which has their defaults."""

    channel: str
    adapter: str | None
    adapter_path: str | None
    echo_of: str | None
    on_progress: ProgressCallback | None
    on_handle: OnHandle | None
    max_attempts: int


@dataclass
class Narration:
    text: str
    """What is shown and stored as the bot's turn."""
    prompt_ids: list[int]
    output: GenerationOutput
    params: SamplingParams
    attempts: int


class Narrator:
    def __init__(self, generator: Generator, safety: SafetyFilter) -> None:
        self.generator = generator
        self.safety = safety
        self.outcomes: dict[str, int] = {}
        """Continuations written so far, by how they ended: eos, length, cancelled or
        failed (what a front end's metrics count)."""

    @property
    def info(self) -> ModelInfo:
        """The model that writes: its tokens, context window and id."""
        return self.generator.info

    @property
    def local_model(self) -> LoadedModel | None:
        """The model's weights in this process, if the generator runs it here (perplexity
        and the reward model's base copy read them); None for one that runs elsewhere."""
        return getattr(self.generator, "model", None)

    def polish(self, raw: str, *, echo_of: str | None = None) -> str:
        """Turn raw model text into what may be shown (`SafetyFilter.polish`)."""
        return self.safety.polish(raw, echo_of=echo_of)

    def _count(self, outcome: str) -> None:
        self.outcomes[outcome] = self.outcomes.get(outcome, 0) + 1

    async def narrate(
        self, prompt: str, params: SamplingParams, **options: Unpack[NarrateOptions]
    ) -> Narration:
        """Continue `prompt`. Retries (with a new seed) when the model produces nothing
        usable; raises `GenerationCancelled` if cancelled, `GenerationFailed` if it never
        produces a sentence."""
        return (await self.narrate_candidates(prompt, params, 1, **options))[0]

    async def narrate_candidates(
        self,
        prompt: str,
        params: SamplingParams,
        n: int,
        *,
        channel: str = "",
        adapter: str | None = None,
        adapter_path: str | None = None,
        echo_of: str | None = None,
        on_progress: ProgressCallback | None = None,
        on_handle: OnHandle | None = None,
        max_attempts: int = 3,
    ) -> list[Narration]:
        """Up to `n` continuations of `prompt` written together (best-of-n: one prefill,
        n seeds), each polished; those that say nothing are dropped. The first
        candidate's text is what `on_progress` shows while they are written. Retries
        (with new seeds) while none is usable; raises `GenerationCancelled` if cancelled,
        `GenerationFailed` if none ever produces a sentence. Each call's outcome is
        counted in `outcomes` (by the candidates' finish reasons, or cancelled, or
        failed)."""
        try:
            prompt_ids = self.info.encode(prompt)
            for attempt in range(1, max_attempts + 1):
                request = GenerationRequest(
                    prompt_ids,
                    params,
                    channel=channel,
                    adapter=adapter,
                    adapter_path=adapter_path,
                    min_new_tokens=MIN_NEW_TOKENS,
                )
                handles = (
                    self.generator.submit_many(request, n)
                    if n > 1
                    else [self.generator.submit(request)]
                )
                if on_handle is not None:
                    for handle in handles:
                        on_handle(handle)
                outputs = await self._write(handles, echo_of, on_progress)
                usable = []
                for handle, output in zip(handles, outputs, strict=True):
                    text = self.polish(output.text, echo_of=echo_of)
                    if text:
                        usable.append(
                            Narration(text, prompt_ids, output, handle.request.params, attempt)
                        )
                if usable:
                    for candidate in usable:
                        self._count(candidate.output.finish_reason)
                    return usable
                if params.seed is not None:
                    params = params.replace(seed=params.seed + n)
            raise GenerationFailed(
                "The storyteller could not find the words this time. Try again, or add a line."
            )
        except GenerationCancelled:
            self._count("cancelled")
            raise
        except GenerationFailed:
            self._count("failed")
            raise

    async def _write(
        self,
        handles: list[GenerationHandle],
        echo_of: str | None,
        on_progress: ProgressCallback | None,
    ) -> list[GenerationOutput]:
        """Wait for every handle's output, showing the first one's text as it grows. One
        that stops or fails stops the others too."""
        try:
            shown = ""
            async for raw in handles[0].stream():
                text = self.polish(raw, echo_of=echo_of)
                if on_progress is not None and text and text != shown:
                    shown = text
                    await on_progress(text)
            return [await handle.result() for handle in handles]
        except BaseException:
            for handle in handles:
                handle.cancel()
            raise
