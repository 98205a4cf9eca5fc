"""Failures stay where they start: one request's bad parameters, damaged adapter, prompt
or prefill never fail the requests decoded beside it, and stopping leaves no one waiting.

Requests decoded together are compared with the same requests decoded alone, token for
token (a row's scores do not depend on the other rows)."""

import asyncio
import logging
import threading
import time

import pytest
import torch

from storyengine.errors import GenerationCancelled, GenerationFailed
from storyengine.sampling import PRESETS, SamplingParams
from storyengine.serving.generation import (
    BASE_ADAPTER,
    STEP_FAILED,
    UNUSABLE_SCORES,
    GenerationRequest,
    SequentialGenerator,
)
from storyengine.serving.scheduler import BatchingGenerator, SchedulerConfig

TEXT = "Once upon a time there was a little girl named Lily. She loved to play outside."

WAIT_S = 60
"""Bound on waiting for an answer: a request that hangs fails the test, not the run."""


def greedy(max_new: int) -> SamplingParams:
    return SamplingParams(max_new_tokens=max_new, temperature=0.0)


def sampled(max_new: int, seed: int) -> SamplingParams:
    return PRESETS["balanced"].params.replace(max_new_tokens=max_new, seed=seed)


def pathological(params: SamplingParams, temperature: float) -> SamplingParams:
    """`params` with a temperature validation refuses (as if it slipped through)."""
    object.__setattr__(params, "temperature", temperature)
    return params


async def results(handles):
    """Each handle's token ids, or the exception it raised."""
    outcomes = await asyncio.wait_for(
        asyncio.gather(*(h.result() for h in handles), return_exceptions=True), WAIT_S
    )
    return [o if isinstance(o, BaseException) else o.token_ids for o in outcomes]


async def alone(model, requests):
    """Each request decoded on its own (one after the other) by a scheduler."""
    scheduler = BatchingGenerator(model)
    try:
        return [(await scheduler.submit(r).result()).token_ids for r in requests]
    finally:
        await scheduler.close()


async def together(model, requests):
    """The requests submitted at once to one scheduler: decoded in one batch."""
    scheduler = BatchingGenerator(model)
    try:
        return await results([scheduler.submit(r) for r in requests])
    finally:
        await scheduler.close()


@pytest.fixture
def thread_errors(monkeypatch):
    """Exceptions that escape any thread during the test."""
    errors: list[BaseException] = []
    monkeypatch.setattr(threading, "excepthook", lambda args: errors.append(args.exc_value))
    return errors


async def test_a_temperature_too_small_to_divide_by_decodes_greedily_and_spares_the_batch(
    tiny_model,
):
    """1e-45 turns the tiny model's logits into infinities (then NaN probabilities): that
    row takes the limit of its distribution, the greedy token, and the others do not
    notice (before: an index of -1, and every request in the batch failed)."""
    ids = tiny_model.encode(TEXT)
    normal = [
        GenerationRequest(ids[:12], greedy(16), channel="a", min_new_tokens=16),
        GenerationRequest(ids[:5], sampled(16, seed=5), channel="b", min_new_tokens=16),
    ]
    tiny = GenerationRequest(
        ids[:9], pathological(sampled(16, seed=3), 1e-45), channel="c", min_new_tokens=16
    )
    its_limit = GenerationRequest(
        ids[:9], sampled(16, seed=3).replace(temperature=0.0), min_new_tokens=16
    )
    expected = await alone(tiny_model, [*normal, its_limit])
    assert await together(tiny_model, [*normal, tiny]) == expected


def blow_up(model, adapter: str, value: float) -> None:
    """Set every weight of one adapter's B matrices to `value`."""
    with torch.no_grad():
        for name, param in model.model.named_parameters():
            if f"lora_B.{adapter}." in name:
                param.fill_(value)


def lora_workload(model):
    ids = model.encode(TEXT)
    return [
        GenerationRequest(ids[:10], greedy(12), channel="a", adapter=BASE_ADAPTER),
        GenerationRequest(ids[:7], sampled(12, seed=2), channel="b", adapter="fox"),
        GenerationRequest(ids[:4], greedy(12), channel="c", adapter="fox"),
    ]


async def test_a_damaged_adapter_fails_only_its_own_request(tiny_lora_model):
    """An adapter whose weights blew up (a diverged training round: finite, but every
    pass through them overflows) gives its rows NaN logits. Its request fails with a
    message for the user and leaves the batch; the others write what they write alone.
    Before, its NaN row was decoded as token 0 (end of text): an empty answer."""
    from tests.helpers.models import make_tiny_lora_model

    healthy = lora_workload(tiny_lora_model)
    expected = await alone(tiny_lora_model, healthy)
    damaged = make_tiny_lora_model()  # its own copy, the same weights
    blow_up(damaged, "owl", 1e20)
    ids = damaged.encode(TEXT)
    owl = [
        GenerationRequest(ids[:6], greedy(12), channel="d", adapter="owl"),
        GenerationRequest(ids[:8], sampled(12, seed=4), channel="e", adapter="owl"),
    ]
    outcomes = await together(damaged, [*healthy, *owl])
    assert outcomes[:3] == expected
    for failure in outcomes[3:]:
        assert isinstance(failure, GenerationFailed)
        assert str(failure) == UNUSABLE_SCORES


async def test_an_adapter_with_nan_weights_fails_only_its_own_request(tiny_lora_model):
    from tests.helpers.models import make_tiny_lora_model

    healthy = lora_workload(tiny_lora_model)
    expected = await alone(tiny_lora_model, healthy)
    damaged = make_tiny_lora_model()
    blow_up(damaged, "owl", float("nan"))
    owl = GenerationRequest(damaged.encode(TEXT)[:6], greedy(12), channel="d", adapter="owl")
    outcomes = await together(damaged, [*healthy, owl])
    assert isinstance(outcomes[3], GenerationFailed)
    assert outcomes[:3] == expected


async def test_a_failing_prefill_fails_only_its_own_request(tiny_model):
    """An empty prompt cannot be prefilled (there is no last token to continue from):
    that request fails, the ones admitted with it and the one already running go on."""
    ids = tiny_model.encode(TEXT)
    running = GenerationRequest(ids[:11], greedy(40), channel="a", min_new_tokens=40)
    newcomers = [
        GenerationRequest(ids[:6], greedy(10), channel="b", min_new_tokens=10),
        GenerationRequest([], greedy(10), channel="c"),
        GenerationRequest(ids[:3], sampled(10, seed=1), channel="d", min_new_tokens=10),
    ]
    expected = await alone(tiny_model, [running, newcomers[0], newcomers[2]])
    scheduler = BatchingGenerator(tiny_model)
    first = scheduler.submit(running)
    async for _ in first.stream():  # it is decoding
        break
    outcomes = await results([first, *(scheduler.submit(r) for r in newcomers)])
    assert isinstance(outcomes[2], GenerationFailed) and str(outcomes[2]) == STEP_FAILED
    assert [outcomes[0], outcomes[1], outcomes[3]] == expected
    # The scheduler serves the next request as if nothing happened.
    assert await results([scheduler.submit(newcomers[0])]) == [expected[1]]
    await scheduler.close()


@pytest.mark.parametrize("kind", ["batching", "sequential"])
async def test_a_token_the_model_does_not_know_fails_only_its_own_request(kind, tiny_model):
    """A prompt id outside the vocabulary is refused before it reaches the model (an
    embedding lookup out of range fails the pass; on a GPU it breaks the device)."""
    ids = tiny_model.encode(TEXT)
    vocabulary = tiny_model.model.get_input_embeddings().num_embeddings
    good = GenerationRequest(ids[:9], greedy(30), channel="a", min_new_tokens=30)
    bad = GenerationRequest([*ids[:5], vocabulary], greedy(5), channel="b")
    (expected,) = await alone(tiny_model, [good])
    generator = (
        BatchingGenerator(tiny_model) if kind == "batching" else SequentialGenerator(tiny_model)
    )
    first = generator.submit(good)
    async for _ in first.stream():
        break
    outcome, failure = await results([first, generator.submit(bad)])
    await generator.close()
    assert outcome == expected
    assert isinstance(failure, ValueError) and "outside the model's vocabulary" in str(failure)


async def test_an_error_in_a_decoding_step_fails_the_batch_with_a_message_and_not_the_next(
    tiny_model, monkeypatch, caplog
):
    """An error that belongs to no one row (out of memory, simulated here in the step
    itself) fails the requests running then, each with a message for the user (the
    error is logged), and the scheduler serves the next requests correctly."""
    from storyengine.serving import gpt2_decode

    ids = tiny_model.encode(TEXT)
    requests = [
        GenerationRequest(ids[:8], greedy(30), channel="a", min_new_tokens=30),
        GenerationRequest(ids[:5], sampled(30, seed=9), channel="b", min_new_tokens=30),
    ]
    expected = await alone(tiny_model, requests)
    real_step, calls = gpt2_decode.decode_step, []

    def out_of_memory_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise torch.OutOfMemoryError("CUDA out of memory (simulated)")
        return real_step(*args, **kwargs)

    monkeypatch.setattr(gpt2_decode, "decode_step", out_of_memory_once)
    scheduler = BatchingGenerator(tiny_model)
    with caplog.at_level(logging.ERROR, logger="storyengine.serving.scheduler"):
        failures = await results([scheduler.submit(r) for r in requests])
    for failure in failures:
        assert isinstance(failure, GenerationFailed) and str(failure) == STEP_FAILED
        assert isinstance(failure.__cause__, torch.OutOfMemoryError)
    assert [r.message for r in caplog.records] == ["scheduler step failed"]
    assert caplog.records[0].exc_info is not None  # with its traceback
    assert await results([scheduler.submit(r) for r in requests]) == expected
    await scheduler.close()


async def test_closing_resolves_every_request_and_raises_nothing(tiny_model, thread_errors, caplog):
    """Running requests end as cancelled with what they wrote, waiting ones (batched,
    beam search, or submitted too late) as cancelled with nothing; no one hangs."""
    ids = tiny_model.encode(TEXT)
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=1))
    beams = PRESETS["focused"].params.replace(max_new_tokens=200)
    running = scheduler.submit(
        GenerationRequest(ids[:5], greedy(200), channel="a", min_new_tokens=200)
    )
    waiting = [
        scheduler.submit(GenerationRequest(ids[:7], greedy(20), channel="b")),
        scheduler.submit(GenerationRequest(ids[:9], greedy(20), channel="c")),
    ]
    beam_handles = [
        scheduler.submit(GenerationRequest(ids[:n], beams, min_new_tokens=200)) for n in (4, 6)
    ]
    async for _ in running.stream():
        break
    with caplog.at_level(logging.WARNING, logger="storyengine"):
        await asyncio.wait_for(scheduler.close(), WAIT_S)
        late = scheduler.submit(GenerationRequest(ids[:3], greedy(5), channel="d"))
        outcomes = await results([running, *waiting, *beam_handles, late])
    assert all(isinstance(o, GenerationCancelled) for o in outcomes), outcomes
    assert 0 < len(outcomes[0].output.token_ids) < 200  # what it wrote before the stop
    for cancelled in [*outcomes[1:3], outcomes[4], outcomes[5]]:
        assert cancelled.output.token_ids == []  # never started
    assert thread_errors == [] and caplog.records == []


@pytest.mark.parametrize("kind", ["batching", "sequential"])
def test_a_worker_that_outlives_its_event_loop_stops_quietly(kind, tiny_model, thread_errors):
    """The process stops mid-generation (SIGTERM): the event loop closes under a worker
    still writing. Its next publication finds no loop: the request is dropped (cancelled,
    so that the worker stops spending time on it) rather than the worker dying on
    "Event loop is closed"."""
    loop = asyncio.new_event_loop()

    async def start():
        generator = (BatchingGenerator if kind == "batching" else SequentialGenerator)(tiny_model)
        request = GenerationRequest(
            tiny_model.encode("A"), greedy(250), channel="a", min_new_tokens=250
        )
        handle = generator.submit(request)
        async for _ in handle.stream():
            break
        return generator, handle

    generator, handle = loop.run_until_complete(start())
    loop.run_until_complete(loop.shutdown_asyncgens())
    loop.close()
    deadline = time.monotonic() + WAIT_S
    while not (handle.cancelled or thread_errors) and time.monotonic() < deadline:
        time.sleep(0.01)  # waiting for the worker's next publication (it comes)
    assert thread_errors == []
    assert handle.cancelled
    asyncio.run(asyncio.wait_for(generator.close(), WAIT_S))  # and it stops when told
    assert thread_errors == []
