import asyncio
import itertools

import pytest
import torch

from storyengine.errors import GenerationCancelled
from storyengine.safety import SafetyFilter
from storyengine.sampling import PRESETS, SamplingParams
from storyengine.serving.generation import GenerationRequest, SequentialGenerator
from storyengine.story.narrator import Narrator


async def test_stream_grows_and_matches_the_result(tiny_model):
    generator = SequentialGenerator(tiny_model)
    prompt = tiny_model.encode("Once upon a time")
    handle = generator.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=12, seed=1)))
    pieces = [p async for p in handle.stream()]
    output = await handle.result()
    await generator.close()
    assert len(pieces) >= 2
    assert all(b.startswith(a) for a, b in itertools.pairwise(pieces))
    assert pieces[-1] == output.text
    assert output.prompt_tokens == len(prompt)
    assert 0 < len(output.token_ids) <= 12
    assert tiny_model.eos_token_id not in output.token_ids


async def test_same_seed_same_text_and_greedy_is_deterministic(tiny_model):
    generator = SequentialGenerator(tiny_model)
    prompt = tiny_model.encode("The fox")

    async def run(params):
        return (await generator.submit(GenerationRequest(prompt, params)).result()).token_ids

    sampled = SamplingParams(max_new_tokens=10, seed=3)
    assert await run(sampled) == await run(sampled)
    greedy = SamplingParams(
        max_new_tokens=10, temperature=0.0, repetition_penalty=1.0, no_repeat_ngram_size=0
    )
    assert greedy.greedy
    assert await run(greedy) == await run(greedy)
    beams = PRESETS["focused"].params.replace(max_new_tokens=10)
    assert len(await run(beams)) > 0
    await generator.close()


async def test_cancel_stops_generation_and_later_requests_wait_their_turn(tiny_model):
    generator = SequentialGenerator(tiny_model)
    long = SamplingParams(max_new_tokens=400, seed=1)
    prompt = tiny_model.encode("A")
    first = generator.submit(GenerationRequest(prompt, long, min_new_tokens=400))
    second = generator.submit(GenerationRequest(prompt, SamplingParams(max_new_tokens=5, seed=1)))
    assert second.queue_position == 1
    async for _ in first.stream():
        first.cancel()
        break
    with pytest.raises(GenerationCancelled) as info:
        await first.result()
    assert len(info.value.output.token_ids) < 400
    assert (await second.result()).finish_reason in {"eos", "length"}
    assert second.queue_position == 0
    await generator.close()


async def test_the_event_loop_stays_responsive_during_generation(tiny_model):
    generator = SequentialGenerator(tiny_model)
    handle = generator.submit(
        GenerationRequest(
            tiny_model.encode("A"), SamplingParams(max_new_tokens=200), min_new_tokens=200
        )
    )
    ticks = 0

    async def ticker():
        nonlocal ticks
        while True:
            await asyncio.sleep(0.01)
            ticks += 1

    task = asyncio.create_task(ticker())
    await handle.result()
    task.cancel()
    await generator.close()
    assert ticks >= 5


async def test_narrator_output_is_clean(bundled_model):
    """Continuations end at a sentence end, hold no control token and no echo."""
    narrator = Narrator(
        SequentialGenerator(bundled_model),
        SafetyFilter(special_tokens=bundled_model.tokenizer.all_special_tokens),
    )
    user_line = "The fox found a key."
    for seed in range(3):
        narration = await narrator.narrate(
            "Once upon a time, a little fox lived in a wood.\n" + user_line + "\n",
            SamplingParams(max_new_tokens=40, seed=seed),
            echo_of=user_line,
        )
        text = narration.text
        assert text and text[-1] in ".!?\"'”"
        assert "<|endoftext|>" not in text
        assert not text.startswith(user_line)
    await narrator.generator.close()


def test_polish_removes_echo_brackets_and_mentions(tiny_model):
    narrator = Narrator(None, SafetyFilter())  # type: ignore[arg-type]
    raw = "The fox found a key. [Author's note: be kind] Then @everyone cheered. And th"
    assert narrator.polish(raw, echo_of="The fox found a key.") == "Then @\u200beveryone cheered."


async def test_a_failing_request_fails_alone_and_the_worker_goes_on():
    """A damaged adapter (weights that blew up: its logits are NaN) fails each of its
    requests, sampled, greedy or beam search, with a message for the user (before:
    sampling raised torch's own error, greedy and beam search wrote nonsense); the
    requests queued behind them are served as if nothing happened."""
    from storyengine.errors import GenerationFailed
    from storyengine.serving.generation import UNUSABLE_SCORES
    from tests.helpers.models import make_tiny_lora_model

    model = make_tiny_lora_model()  # its own copy: one adapter is damaged
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if "lora_B.owl." in name:
                param.fill_(1e20)
    prompt = model.encode("The fox")
    styles = [
        SamplingParams(max_new_tokens=8, seed=1),
        SamplingParams(max_new_tokens=8, temperature=0.0),
        PRESETS["focused"].params.replace(max_new_tokens=8),
    ]
    generator = SequentialGenerator(model)
    fox = GenerationRequest(prompt, styles[0], adapter="fox")
    expected = (await generator.submit(fox).result()).token_ids
    handles = [generator.submit(GenerationRequest(prompt, p, adapter="owl")) for p in styles]
    after = generator.submit(fox)
    for handle in handles:
        with pytest.raises(GenerationFailed) as info:
            await handle.result()
        assert str(info.value) == UNUSABLE_SCORES
    assert (await after.result()).token_ids == expected
    await generator.close()
