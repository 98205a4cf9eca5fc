"""The batching scheduler against the naive baseline (sequential `model.generate`)."""

import asyncio

import pytest
import torch

from storyengine.errors import GenerationCancelled
from storyengine.sampling import PRESETS, SamplingParams
from storyengine.serving.generation import BASE_ADAPTER, GenerationRequest, SequentialGenerator
from storyengine.serving.multilora import MultiLoRA
from storyengine.serving.scheduler import BatchingGenerator, SchedulerConfig
from tests.helpers.models import make_tiny_lora_model

TEXT = (
    "Once upon a time there was a little girl named Lily. She loved to play outside in the "
    "sun with her dog. One day they found a big red ball in the garden. "
) * 5


def greedy(max_new: int, rep: float = 1.0, ngram: int = 0) -> SamplingParams:
    return SamplingParams(
        max_new_tokens=max_new, temperature=0.0, repetition_penalty=rep, no_repeat_ngram_size=ngram
    )


def workload(model, adapters=(None,)):
    ids = model.encode(TEXT)
    shapes = [
        (5, 20, 1.0, 0),
        (17, 30, 1.2, 3),
        (40, 10, 1.0, 0),
        (90, 25, 1.3, 2),
        (150, 15, 1.0, 3),
        (33, 40, 1.1, 0),
        (8, 5, 1.0, 0),
        (120, 35, 1.2, 3),
    ]
    return [
        GenerationRequest(
            ids[:length],
            greedy(new, rep, ngram),
            channel=f"c{i % 3}",
            adapter=adapters[i % len(adapters)],
            min_new_tokens=3,
        )
        for i, (length, new, rep, ngram) in enumerate(shapes)
    ]


async def baseline_outputs(model, requests):
    generator = SequentialGenerator(model)
    outputs = [(await generator.submit(r).result()).token_ids for r in requests]
    await generator.close()
    return outputs


def assert_same_or_near_tie(model, request, expected, actual):
    """Equal token for token, or the first difference is a genuine near-tie (< 1e-4)."""
    if expected == actual:
        return
    first = next(i for i, (a, b) in enumerate(zip(expected, actual, strict=False)) if a != b)
    prefix = torch.tensor([request.prompt_ids + expected[:first]])
    with torch.no_grad():
        logits = model.model(input_ids=prefix).logits[0, -1]
    top2 = logits.topk(2).values
    assert float(top2[0] - top2[1]) < 1e-4, f"outputs differ at {first} without a near-tie"


@pytest.mark.parametrize("which", ["tiny", "tiny_lora"])
async def test_greedy_outputs_equal_the_baseline(which, tiny_model, tiny_lora_model):
    model = tiny_model if which == "tiny" else tiny_lora_model
    adapters = (None,) if which == "tiny" else (None, "fox", "owl", BASE_ADAPTER)
    requests = workload(model, adapters)
    expected = await baseline_outputs(model, requests)
    if which == "tiny_lora":  # the adapters really change the text
        assert len({tuple(e) for e in expected[:4]}) > 1
    scheduler = BatchingGenerator(model)
    handles = []
    for i, request in enumerate(requests):
        handles.append(scheduler.submit(request))
        if i == 3:  # the rest join a batch already decoding
            await asyncio.sleep(0.05)
    actual = [(await h.result()).token_ids for h in handles]
    await scheduler.close()
    for request, e, a in zip(requests, expected, actual, strict=True):
        assert_same_or_near_tie(model, request, e, a)


async def test_multilora_matches_peft_per_row(tiny_lora_model):
    model = tiny_lora_model.model
    ids = torch.tensor([tiny_lora_model.encode(TEXT)[:12]] * 4)
    rows = ["fox", "owl", BASE_ADAPTER, "fox"]
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=rows).logits
        multi = MultiLoRA.attach(model)
        assert MultiLoRA.attach(model) is multi  # one per model, however many generators
        with multi.rows(rows):
            actual = model.get_base_model()(input_ids=ids).logits
        outside = model.get_base_model()(input_ids=ids[:1]).logits  # peft's own path again
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(outside, expected[:1], atol=1e-5, rtol=1e-4)  # active adapter "fox"


@pytest.mark.parametrize("rows", [["owl"] * 3, ["fox"] * 3, ["owl", BASE_ADAPTER, "owl"]])
async def test_multilora_reads_only_the_adapters_a_batch_uses(rows):
    """A batch on one adapter of several loaded multiplies by that adapter's columns
    alone, with no mask, and still equals peft's per-row forward."""
    loaded = make_tiny_lora_model()  # its own: attaching reroutes the layers
    model = loaded.model
    ids = torch.tensor([loaded.encode(TEXT)[:12]] * len(rows))
    multi = MultiLoRA.attach(model)
    layer = multi.layers[0]
    with torch.no_grad():
        expected = model(input_ids=ids, adapter_names=rows).logits
        with multi.rows(rows):
            actual = model.get_base_model()(input_ids=ids).logits
            lo, hi, mask = multi._columns(layer, torch.zeros(len(rows), 1, 1))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-4)
    adapter = next(name for name in rows if name != BASE_ADAPTER)
    assert (lo, hi) == layer._multilora_spans[adapter]  # not the other adapter's columns
    assert (mask is None) == (len(set(rows)) == 1)


async def test_multilora_a_batch_on_one_damaged_adapter_comes_out_nan():
    loaded = make_tiny_lora_model()
    model = loaded.model
    for name, param in model.named_parameters():
        if "lora_A.owl" in name:
            param.data.fill_(float("nan"))
    multi = MultiLoRA.attach(model)
    ids = torch.tensor([loaded.encode(TEXT)[:12]] * 2)
    with torch.no_grad(), multi.rows(["owl", "owl"]):
        logits = model.get_base_model()(input_ids=ids).logits
    assert logits.isnan().all(dim=-1).all()


async def test_a_request_joining_mid_batch_finishes_first_and_correctly(tiny_model):
    long = GenerationRequest(tiny_model.encode("A long tale"), greedy(200), min_new_tokens=200)
    short = GenerationRequest(tiny_model.encode("The dog"), greedy(8), min_new_tokens=8)
    expected_short = (await baseline_outputs(tiny_model, [short]))[0]
    scheduler = BatchingGenerator(tiny_model)
    long_handle = scheduler.submit(long)
    async for text in long_handle.stream():
        if len(text) > 20:
            break
    short_handle = scheduler.submit(short)
    short_out = await short_handle.result()
    assert not (long_handle._future.done()), "the short request waited for the long one"
    assert short_out.token_ids == expected_short
    long_out = await long_handle.result()
    assert len(long_out.token_ids) == 200
    await scheduler.close()


async def test_cancellation_frees_the_slot(tiny_model):
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=1))
    first = scheduler.submit(
        GenerationRequest(tiny_model.encode("A"), greedy(400), min_new_tokens=400)
    )
    second = scheduler.submit(GenerationRequest(tiny_model.encode("B"), greedy(5)))
    async for _ in first.stream():
        break
    assert second.queue_position == 0 and scheduler.running == 1
    first.cancel()
    with pytest.raises(GenerationCancelled) as info:
        await first.result()
    assert len(info.value.output.token_ids) < 400
    assert len((await second.result()).token_ids) == 5
    await scheduler.close()


async def test_a_cancelled_waiting_request_never_runs(tiny_model):
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=1))
    running = scheduler.submit(
        GenerationRequest(tiny_model.encode("A"), greedy(30), min_new_tokens=30)
    )
    waiting = scheduler.submit(GenerationRequest(tiny_model.encode("B"), greedy(30)))
    waiting.cancel()
    with pytest.raises(GenerationCancelled) as info:
        await waiting.result()
    assert info.value.output.token_ids == []
    await running.result()
    await scheduler.close()


async def test_fairness_one_busy_channel_cannot_starve_another(tiny_model):
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=1))
    started: list[str] = []

    def request(channel):
        return GenerationRequest(
            tiny_model.encode("Tell"), greedy(60), channel=channel, min_new_tokens=60
        )

    busy = [scheduler.submit(request("busy")) for _ in range(6)]
    async for _ in busy[0].stream():  # the busy channel's first request is running
        break
    quiet = scheduler.submit(request("quiet"))

    async def track(name, handle):
        async for _ in handle.stream():
            started.append(name)
            break
        await handle.result()

    await asyncio.gather(*(track("busy", h) for h in busy), track("quiet", quiet))
    # The quiet channel is served after at most two of the busy channel's requests
    # (the one running when it arrived and the one already admitted), not after all six.
    assert started.index("quiet") <= 2
    await scheduler.close()


async def test_queue_positions_interleave_channels(tiny_model):
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=1))
    blocker = scheduler.submit(
        GenerationRequest(tiny_model.encode("A"), greedy(60), channel="x", min_new_tokens=60)
    )
    async for _ in blocker.stream():
        break
    a = [
        scheduler.submit(GenerationRequest(tiny_model.encode("B"), greedy(3), channel="a"))
        for _ in range(3)
    ]
    b = scheduler.submit(GenerationRequest(tiny_model.encode("C"), greedy(3), channel="b"))
    for _ in range(100):
        await asyncio.sleep(0.01)
        if b.queue_position != 3:
            break
    assert [h.queue_position for h in a] == [0, 2, 3]
    assert b.queue_position == 1
    await asyncio.gather(blocker.result(), *(h.result() for h in [*a, b]))
    await scheduler.close()


async def test_seeded_sampling_does_not_depend_on_the_batch(tiny_model):
    params = PRESETS["balanced"].params.replace(max_new_tokens=20, seed=42)
    request = GenerationRequest(tiny_model.encode("The cat"), params)
    scheduler = BatchingGenerator(tiny_model)
    alone = (await scheduler.submit(request).result()).token_ids
    others = [
        scheduler.submit(GenerationRequest(tiny_model.encode(TEXT[:n]), params.replace(seed=n)))
        for n in (20, 60, 90)
    ]
    together = (await scheduler.submit(request).result()).token_ids
    await asyncio.gather(*(h.result() for h in others))
    await scheduler.close()
    assert alone == together


async def test_state_is_released_after_every_request(tiny_model):
    scheduler = BatchingGenerator(tiny_model, SchedulerConfig(max_batch_size=4))
    for round_ in range(5):
        handles = [
            scheduler.submit(
                GenerationRequest(tiny_model.encode(TEXT[: 10 + 7 * i]), greedy(5 + i))
            )
            for i in range(6)
        ]
        await asyncio.gather(*(h.result() for h in handles))

        def released():
            return (
                scheduler.running == 0
                and scheduler._runner.cache is None
                and scheduler._runner.mask is None
                and not scheduler._waiting
                and not scheduler._inbox
            )

        for _ in range(100):  # the worker clears its state just after answering
            if released():
                break
            await asyncio.sleep(0.01)
        assert released(), round_
    await scheduler.close()


async def test_beam_search_is_served_beside_the_batch(tiny_model):
    scheduler = BatchingGenerator(tiny_model)
    beams = PRESETS["focused"].params.replace(max_new_tokens=8)
    request = GenerationRequest(tiny_model.encode("The dog"), beams)
    expected = (await baseline_outputs(tiny_model, [request]))[0]
    assert (await scheduler.submit(request).result()).token_ids == expected
    await scheduler.close()


async def test_an_adapter_that_is_not_loaded_fails_only_its_own_request(tiny_lora_model):
    scheduler = BatchingGenerator(tiny_lora_model)
    ids = tiny_lora_model.encode(TEXT[:60])
    good = scheduler.submit(GenerationRequest(ids, greedy(20), channel="a"))
    bad = scheduler.submit(GenerationRequest(ids, greedy(5), channel="b", adapter="nope"))
    with pytest.raises(ValueError, match="no adapter named 'nope'"):
        await bad.result()
    assert len((await good.result()).token_ids) == 20
    await scheduler.close()


async def test_a_replaced_adapter_is_unloaded_once_nothing_uses_it(tmp_path):
    """Hot-swapping registry versions does not keep every version loaded; a sequence
    still writing with the old one finishes on it first."""
    from tests.helpers.models import make_tiny_lora_model

    model = make_tiny_lora_model()  # its own copy: adapters are loaded and unloaded
    for name in ("fox", "owl"):
        model.model.save_pretrained(str(tmp_path / name), selected_adapters=[name])
    scheduler = BatchingGenerator(model)
    ids = model.encode(TEXT[:40])
    await scheduler.use_adapter("v1", str(tmp_path / "fox" / "fox"))
    long_on_v1 = scheduler.submit(GenerationRequest(ids, greedy(60), channel="a"))
    while scheduler.running == 0:  # noqa: ASYNC110 (the worker thread has no event)
        await asyncio.sleep(0.005)
    await scheduler.use_adapter("v2", str(tmp_path / "owl" / "owl"))
    assert "v1" in model.model.peft_config  # still writing
    on_v2 = await scheduler.submit(GenerationRequest(ids, greedy(5), channel="b")).result()
    assert on_v2.adapter == "v2"
    first = await long_on_v1.result()
    assert first.adapter == "v1" and len(first.token_ids) == 60
    await scheduler.submit(GenerationRequest(ids, greedy(2), channel="c")).result()
    assert "v1" not in model.model.peft_config
    assert {"fox", "owl", "v2"} <= set(model.model.peft_config)  # not loaded from disk: kept
    await scheduler.use_adapter(BASE_ADAPTER)
    await scheduler.submit(GenerationRequest(ids, greedy(2), channel="c")).result()
    assert "v2" not in model.model.peft_config
    # Loaded again when promoted again (a rollback), and it writes as before.
    await scheduler.use_adapter("v1", str(tmp_path / "fox" / "fox"))
    again = await scheduler.submit(GenerationRequest(ids, greedy(60), channel="a")).result()
    assert again.token_ids == first.token_ids
    await scheduler.close()
