"""The storyteller writing: generations in flight per channel, best-of-n ranked by the
reward model, and every generation recorded (a cancelled one too) for learning.
"""

from __future__ import annotations

from typing import Any

from ..errors import GenerationCancelled
from ..records import Story, Turn, TurnResult
from ..sampling import SamplingParams
from ..serving.generation import BASE_ADAPTER, GenerationHandle, GenerationOutput
from ..storage import TellingRecords
from .adapters import StoryAdapters
from .narrator import Narration, ProgressCallback
from .stories import Stories

SHUTTING_DOWN = (
    "The storyteller was stopped: the bot is shutting down. Your line is kept; "
    "continue when it is back."
)


class Writer:
    def __init__(self, stories: Stories, adapters: StoryAdapters) -> None:
        self.stories = stories
        self.store: TellingRecords = stories.store
        self.adapters = adapters
        self.in_flight: dict[str, set[GenerationHandle]] = {}
        self.closing = False

    # -- generations in flight ---------------------------------------------------------

    def is_generating(self, channel: str) -> bool:
        return channel in self.in_flight

    def queue_position(self, channel: str) -> int | None:
        """How many requests are ahead of this channel's generation (0 once it is
        being written), or None when the channel is not generating."""
        handles = self.in_flight.get(channel)
        return min(h.queue_position for h in handles) if handles else None

    def cancel(self, channel: str) -> bool:
        """Cancel the channel's generation in progress. True if there was one."""
        handles = self.in_flight.get(channel)
        if not handles:
            return False
        for handle in list(handles):
            handle.cancel()
        return True

    def cancel_all(self) -> int:
        """Stop every generation in progress (they end as cancelled and are recorded as
        such); new ones are refused from now on. Returns how many were stopped."""
        self.closing = True
        stopped = 0
        for handles in list(self.in_flight.values()):
            for handle in list(handles):
                handle.cancel()
                stopped += 1
        return stopped

    # -- writing ---------------------------------------------------------------------------

    async def write_turn(
        self,
        story: Story,
        turns: list[Turn],
        action: int,
        user_turn: Turn | None,
        on_progress: ProgressCallback | None,
        params: SamplingParams | None = None,
        *,
        replacing: Turn | None = None,
    ) -> TurnResult:
        """Write the storyteller's turn: with a reward model served, `best_of`
        candidates at once, the best shown and the others kept as its alternatives
        (best first: a retry shows the next best before writing anew)."""
        if params is None:
            params = await self.stories.sampling_for(story.channel)
        prompt = await self.stories.prompt(story, turns, params)
        written = await self.narrate_best(
            story,
            prompt,
            params,
            echo_of=user_turn.text if user_turn else None,
            on_progress=on_progress,
        )
        (narration, generation_id), others = written[0], written[1:]
        turn = await self.store.add_turn(
            story.id,
            action=action,
            kind="bot",
            text=narration.text,
            generation_id=generation_id,
            position=replacing.position if replacing else None,
            replacing=replacing.id if replacing else None,
        )
        for other, other_id in others:
            await self.store.add_turn(
                story.id,
                action=action,
                kind="bot",
                text=other.text,
                generation_id=other_id,
                position=turn.position,
                status="replaced",
            )
        return TurnResult(story, turn, user_turn, generation_id, narration.output.latency_s)

    async def narrate(
        self,
        story: Story,
        prompt: str,
        params: SamplingParams,
        *,
        echo_of: str | None,
        on_progress: ProgressCallback | None = None,
    ) -> tuple[Narration, int]:
        """Generate one continuation and record it (a cancelled one too)."""
        written = await self.narrate_best(
            story, prompt, params.replace(best_of=1), echo_of=echo_of, on_progress=on_progress
        )
        return written[0]

    async def narrate_best(
        self,
        story: Story,
        prompt: str,
        params: SamplingParams,
        *,
        echo_of: str | None,
        on_progress: ProgressCallback | None = None,
    ) -> list[tuple[Narration, int]]:
        """Generate the continuations of a turn and record them (a cancelled one too):
        one, or with a reward model served and `params.best_of` > 1, that many written
        together (one prefill) and ranked by the reward model, best first."""
        if self.closing:
            raise GenerationCancelled(message=SHUTTING_DOWN)
        channel = story.channel
        await self.adapters.sync()
        adapter = await self.adapters.adapter_for(story)
        scorer = await self.adapters.scorer_for(story) if params.best_of > 1 else None
        n = params.best_of if scorer is not None else 1
        record = {"story_id": story.id, "channel": channel, "prompt": prompt}
        handles: list[GenerationHandle] = []

        def track(handle: Any) -> None:
            handles.append(handle)
            self.in_flight.setdefault(channel, set()).add(handle)
            if self.closing:  # shutting down since the request was made
                handle.cancel()

        try:
            candidates = await self.stories.narrator.narrate_candidates(
                prompt,
                params,
                n,
                channel=channel,
                adapter=adapter[0] if adapter else None,
                adapter_path=adapter[1] if adapter else None,
                echo_of=echo_of,
                on_progress=on_progress,
                on_handle=track,
            )
        except GenerationCancelled as cancelled:
            if isinstance(cancelled.output, GenerationOutput):
                await self._record(record, params, cancelled.output, shown="")
            if self.closing:
                raise GenerationCancelled(cancelled.output, message=SHUTTING_DOWN) from None
            raise
        finally:
            in_flight = self.in_flight.get(channel, set())
            in_flight.difference_update(handles)
            if not in_flight:
                self.in_flight.pop(channel, None)
        rewards: list[float | None] = [None] * len(candidates)
        if scorer is not None and len(candidates) > 1:
            rewards = list(await scorer([prompt] * len(candidates), [c.text for c in candidates]))
        order = sorted(range(len(candidates)), key=lambda i: -(rewards[i] or 0.0))
        written = []
        for i in order:
            narration = candidates[i]
            generation_id = await self._record(
                record, narration.params, narration.output, shown=narration.text, reward=rewards[i]
            )
            written.append((narration, generation_id))
        if len(written) > 1:
            await self.store.set_candidate_group([g for _, g in written], written[0][1])
        return written

    async def _record(
        self,
        record: dict[str, Any],
        params: SamplingParams,
        output: GenerationOutput,
        *,
        shown: str,
        reward: float | None = None,
    ) -> int:
        model = self.stories.narrator.info
        return await self.store.record_generation(
            reward=reward,
            **record,
            output=shown,
            raw_output=output.text,
            params=params.to_dict(),
            model_id=model.model_id,
            adapter_id=None if output.adapter == BASE_ADAPTER else output.adapter,
            prompt_tokens=output.prompt_tokens,
            output_tokens=len(output.token_ids),
            finish_reason="cancelled"
            if not shown and output.finish_reason == "cancelled"
            else output.finish_reason,
            latency_s=output.latency_s,
            ttft_s=output.ttft_s,
        )
