"""Best-of-n: n candidates of one prompt that share one prefill (`submit_many`)."""

import asyncio
import dataclasses

import pytest

from storyengine.errors import GenerationCancelled
from storyengine.sampling import PRESETS, SamplingParams
from storyengine.serving.generation import BASE_ADAPTER, GenerationRequest, SequentialGenerator
from storyengine.serving.scheduler import BatchingGenerator, SchedulerConfig

TEXT = (
    "Once upon a time there was a little girl named Lily. She loved to play outside in the "
    "sun with her dog. One day they found a big red ball in the garden. "
) * 5


def sampled(max_new: int, seed: int | None = 5) -> SamplingParams:
    return PRESETS["balanced"].params.replace(max_new_tokens=max_new, seed=seed)


def request(model, length, max_new, seed=5, channel="c", adapter=None):
    return GenerationRequest(
        model.encode(TEXT)[:length],
        sampled(max_new, seed),
        channel=channel,
        adapter=adapter,
        min_new_tokens=max_new,
    )


def with_seed(r: GenerationRequest, seed: int) -> GenerationRequest:
    return dataclasses.replace(r, params=r.params.replace(seed=seed))


async def alone(model, requests):
    """Each request's tokens, decoded by the scheduler with nothing else in the batch."""
    scheduler = BatchingGenerator(model)
    outputs = [(await scheduler.submit(r).result()).token_ids for r in requests]
    await scheduler.close()
    return outputs


async def first_token(handle):
    async for _ in handle.stream():
        return


async def test_the_candidates_share_one_prefill(tiny_model):
    prompt = request(tiny_model, 40, 12)
    scheduler = BatchingGenerator(tiny_model)
    handles = scheduler.submit_many(prompt, 4)
    outputs = [(await h.result()).token_ids for h in handles]
    assert scheduler.prefilled_tokens == 40  # not 4 * 40
    assert len({tuple(o) for o in outputs}) > 1  # different seeds, different texts
    assert [h.request.params.seed for h in handles] == [5, 6, 7, 8]
    # Four separate requests pay four prefills (the counter counts what it claims).
    await asyncio.gather(*(scheduler.submit(with_seed(prompt, s)).result() for s in (5, 6)))
    assert scheduler.prefilled_tokens == 40 + 2 * 40
    await scheduler.close()


@pytest.mark.parametrize("which", ["tiny", "tiny_lora"])
async def test_each_candidate_writes_what_its_seed_writes_alone(which, tiny_model, tiny_lora_model):
    """The prompt's keys and values copied into n rows are right: every candidate, in a
    batch with other groups and single requests (other lengths, other adapters, one
    already decoding when they join), equals a single request with its seed, alone."""
    model = tiny_model if which == "tiny" else tiny_lora_model
    adapters = (None, None, None) if which == "tiny" else ("fox", "owl", BASE_ADAPTER)
    running = request(model, 70, 30, seed=1, channel="a", adapter=adapters[2])
    groups = [
        (request(model, 25, 16, seed=10, channel="b", adapter=adapters[0]), 4),
        (request(model, 90, 12, seed=20, channel="c", adapter=adapters[1]), 3),
    ]
    single = request(model, 25, 16, seed=30, channel="d", adapter=adapters[1])
    expected_groups = [
        await alone(model, [with_seed(r, r.params.seed + i) for i in range(n)]) for r, n in groups
    ]
    expected_single, expected_running = await alone(model, [single, running])

    scheduler = BatchingGenerator(model)
    first = scheduler.submit(running)
    await first_token(first)  # the rest join a batch already decoding
    handles = [scheduler.submit_many(r, n) for r, n in groups]
    other = scheduler.submit(single)
    actual = [[(await h.result()).token_ids for h in hs] for hs in handles]
    assert actual == expected_groups
    assert (await other.result()).token_ids == expected_single
    assert (await first.result()).token_ids == expected_running
    assert scheduler.prefilled_tokens == 70 + 25 + 90 + 25
    await scheduler.close()


async def test_a_request_that_does_not_sample_gets_one_handle(tiny_model):
    greedy = GenerationRequest(
        tiny_model.encode("The dog"),
        SamplingParams(max_new_tokens=5, temperature=0.0, repetition_penalty=1.0),
    )
    beams = dataclasses.replace(greedy, params=PRESETS["focused"].params.replace(max_new_tokens=5))
    scheduler = BatchingGenerator(tiny_model)
    for r in (greedy, beams):
        handles = scheduler.submit_many(r, 4)
        assert len(handles) == 1
        assert len((await handles[0].result()).token_ids) > 0
    with pytest.raises(ValueError, match="at least one"):
        scheduler.submit_many(greedy, 0)
    await scheduler.close()


async def test_n_is_clamped_to_what_an_empty_batch_holds(tiny_model):
    r = request(tiny_model, 10, 10)  # 20 tokens a row
    scheduler = BatchingGenerator(
        tiny_model, SchedulerConfig(max_batch_size=3, max_tokens_in_flight=1000)
    )
    assert len(scheduler.submit_many(r, 5)) == 3
    tight = BatchingGenerator(
        tiny_model, SchedulerConfig(max_batch_size=8, max_tokens_in_flight=50)
    )
    handles = tight.submit_many(r, 5)
    assert len(handles) == 2
    assert [len((await h.result()).token_ids) for h in handles] == [10, 10]
    await scheduler.close()
    await tight.close()


def started_at(handle, output):
    return handle.submitted_at + output.ttft_s


def ended_at(handle, output):
    return handle.submitted_at + output.latency_s


async def test_the_batch_bounds_count_every_candidate_and_a_group_joins_whole(tiny_model):
    """Batch of 6: a single request and a best-of-4 run (5 rows); another best-of-4
    (4 more rows) waits until it fits whole, then its candidates start together."""
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=6))
    single = scheduler.submit(request(tiny_model, 8, 10, channel="a"))
    first = scheduler.submit_many(request(tiny_model, 20, 40, channel="b"), 4)
    await first_token(first[0])
    second = scheduler.submit_many(request(tiny_model, 30, 10, channel="c"), 4)
    assert {h.queue_position for h in second} == {0}  # one request ahead of no one
    outs = {h: await h.result() for h in [single, *first, *second]}
    first_done = max(ended_at(h, outs[h]) for h in first)
    starts = [started_at(h, outs[h]) for h in second]
    assert min(starts) >= first_done  # 1 + 4 + 4 rows never ran together
    assert max(starts) - min(starts) < 1e-6  # all four joined in the same step
    assert scheduler.prefilled_tokens == 8 + 20 + 30
    await scheduler.close()


async def test_a_best_of_channel_does_not_starve_a_plain_one(tiny_model):
    """A channel asking for best-of-4 three times over, in a batch that holds one group:
    a plain channel arriving meanwhile is served after at most the group running and the
    one already next in turn, not after all three."""
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=4))
    started: list[str] = []

    async def track(name, handles):
        await first_token(handles[0])
        started.append(name)
        await asyncio.gather(*(h.result() for h in handles))

    best = [scheduler.submit_many(request(tiny_model, 12, 30, channel="best"), 4) for _ in range(3)]
    await first_token(best[0][0])
    plain = [scheduler.submit(request(tiny_model, 12, 30, channel="plain"))]
    await asyncio.gather(*(track("best", hs) for hs in best), track("plain", plain))
    assert started.index("plain") <= 2
    await scheduler.close()


async def test_cancelling_one_candidate_ends_that_row_alone(tiny_model):
    r = request(tiny_model, 30, 120)
    expected = await alone(tiny_model, [with_seed(r, 5 + i) for i in range(3)])
    scheduler = BatchingGenerator(tiny_model)
    handles = scheduler.submit_many(r, 3)
    await first_token(handles[1])
    handles[1].cancel()
    with pytest.raises(GenerationCancelled) as info:
        await handles[1].result()
    assert len(info.value.output.token_ids) < 120
    assert (await handles[0].result()).token_ids == expected[0]
    assert (await handles[2].result()).token_ids == expected[2]
    await scheduler.close()


async def test_cancelling_every_candidate_frees_every_row(tiny_model):
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=4))
    handles = scheduler.submit_many(request(tiny_model, 30, 400), 4)
    await first_token(handles[0])
    assert scheduler.running == 4
    waiting = scheduler.submit(request(tiny_model, 10, 5, channel="other"))
    for h in handles:
        h.cancel()
    for h in handles:
        with pytest.raises(GenerationCancelled):
            await h.result()
    assert len((await waiting.result()).token_ids) == 5  # the rows were given back
    for _ in range(100):  # the worker clears its state just after answering
        if scheduler.running == 0 and scheduler._runner.cache is None:
            break
        await asyncio.sleep(0.01)
    assert scheduler.running == 0 and scheduler._runner.cache is None
    await scheduler.close()


async def test_a_candidate_cancelled_while_waiting_leaves_the_others_to_run(tiny_model):
    r = request(tiny_model, 20, 8, channel="b")
    expected = await alone(tiny_model, [with_seed(r, 5 + i) for i in range(3)])
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=3))
    blocker = scheduler.submit(request(tiny_model, 10, 60, channel="a"))
    await first_token(blocker)
    handles = scheduler.submit_many(r, 3)  # needs the whole batch: waits
    handles[0].cancel()
    with pytest.raises(GenerationCancelled) as info:
        await handles[0].result()
    assert info.value.output.token_ids == []
    assert [(await h.result()).token_ids for h in handles[1:]] == expected[1:]
    await blocker.result()
    await scheduler.close()


async def test_sequential_candidates_are_the_seeds_requests(tiny_model):
    generator = SequentialGenerator(tiny_model)
    r = request(tiny_model, 20, 8)
    handles = generator.submit_many(r, 3)
    outputs = [(await h.result()).token_ids for h in handles]
    separate = [(await generator.submit(with_seed(r, 5 + i)).result()).token_ids for i in range(3)]
    assert outputs == separate and len({tuple(o) for o in outputs}) > 1
    await generator.close()
