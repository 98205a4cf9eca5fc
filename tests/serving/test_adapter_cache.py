"""Adapters loaded on demand from a request's path, at most a bound of them kept (LRU),
never one that a request in flight uses."""

import asyncio

import pytest
import torch

from storyengine.errors import GenerationFailed
from storyengine.sampling import PRESETS, SamplingParams
from storyengine.serving.generation import (
    ADAPTER_UNAVAILABLE,
    GenerationRequest,
    SequentialGenerator,
)
from storyengine.serving.scheduler import BatchingGenerator, SchedulerConfig

TEXT = "Once upon a time there was a little fox who lived by a river with his friend. " * 4


@pytest.fixture(scope="module")
def adapter_dirs(tmp_path_factory):
    """Four real peft adapters of the tiny GPT-2, each saved to its own directory."""
    import copy

    from peft import LoraConfig, get_peft_model

    from tests.helpers.models import make_tiny_model

    root = tmp_path_factory.mktemp("adapters")
    tiny = make_tiny_model().model
    dirs = {}
    for i, name in enumerate(["c123-v4", "v7", "c9-v1", "c9-v2"]):
        base = copy.deepcopy(tiny)
        torch.manual_seed(100 + i)
        config = LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=["c_attn", "c_proj", "c_fc"],
            fan_in_fan_out=True,
            init_lora_weights=False,
        )
        model = get_peft_model(base, config)
        for param_name, param in model.named_parameters():
            if "lora_B" in param_name:  # large enough to change the greedy text
                param.data.normal_(0, 0.5)
        model.save_pretrained(str(root / name))
        dirs[name] = str(root / name)
    return dirs


def greedy(max_new):
    return SamplingParams(max_new_tokens=max_new, temperature=0.0, repetition_penalty=1.0)


def ask(model, dirs, adapter, max_new=12, length=20, channel="c", params=None):
    return GenerationRequest(
        model.encode(TEXT)[:length],
        params or greedy(max_new),
        channel=channel,
        adapter=adapter,
        adapter_path=dirs[adapter] if adapter else None,
        min_new_tokens=max_new,
    )


async def alone(request):
    """The request's tokens on a fresh model that has only its adapter."""
    from tests.helpers.models import make_tiny_model

    scheduler = BatchingGenerator(make_tiny_model())
    tokens = (await scheduler.submit(request).result()).token_ids
    await scheduler.close()
    return tokens


async def first_token(handle):
    async for _ in handle.stream():
        return


async def test_two_adapters_loaded_on_demand_decode_together_as_alone(adapter_dirs):
    from tests.helpers.models import make_tiny_model

    model = make_tiny_model()  # no adapters: the first one loaded wraps it
    a = ask(model, adapter_dirs, "c123-v4", channel="a")
    b = ask(model, adapter_dirs, "v7", length=33, channel="b")
    base = ask(model, adapter_dirs, None, channel="c")
    expected = [await alone(r) for r in (a, b, base)]
    same_prompt = ask(model, adapter_dirs, "v7")
    assert len({tuple(expected[0]), tuple(expected[2]), tuple(await alone(same_prompt))}) == 3
    scheduler = BatchingGenerator(model)
    handles = [scheduler.submit(r) for r in (a, b, base)]
    assert [(await h.result()).token_ids for h in handles] == expected
    assert [(await h.result()).adapter for h in handles[:2]] == ["c123-v4", "v7"]
    assert scheduler.adapters.loads == 2
    # Sampled best-of-n with an adapter loaded on demand: candidate 0 is the request.
    sampled = ask(model, adapter_dirs, "v7", params=PRESETS["balanced"].params.replace(seed=3))
    candidates = scheduler.submit_many(sampled, 3)
    outputs = [(await h.result()).token_ids for h in candidates]
    assert outputs[0] == await alone(sampled)
    await scheduler.close()


async def test_at_most_the_bound_stay_loaded_least_recently_used_first(adapter_dirs):
    from tests.helpers.models import make_tiny_model

    model = make_tiny_model()
    scheduler = BatchingGenerator(model, SchedulerConfig(max_loaded_adapters=2))
    expected = {}
    for name in ["c123-v4", "v7", "c123-v4", "c9-v1", "c9-v2", "c123-v4"]:
        request = ask(model, adapter_dirs, name)
        tokens = (await scheduler.submit(request).result()).token_ids
        expected.setdefault(name, tokens)
        assert tokens == expected[name]  # reloaded, it writes as before
        assert len(model.model.peft_config) <= 2
    # c9-v1 pushed out v7 (c123-v4 had been used after it), c9-v2 pushed out c123-v4,
    # which, loaded again, pushed out c9-v1.
    assert list(scheduler.adapters.loaded) == ["c9-v2", "c123-v4"]
    assert set(model.model.peft_config) == {"c9-v2", "c123-v4"}
    assert scheduler.adapters.loads == 5
    await scheduler.close()


async def test_an_adapter_in_use_is_never_unloaded(adapter_dirs):
    """Bound 1, two adapters running at once and a third request waiting for the first
    one: none is unloaded while a request names it (the bound is exceeded meanwhile), and
    each writes what it writes alone."""
    from tests.helpers.models import make_tiny_model

    model = make_tiny_model()
    scheduler = BatchingGenerator(model, SchedulerConfig(max_batch_size=2, max_loaded_adapters=1))
    long_a = ask(model, adapter_dirs, "c123-v4", max_new=60, channel="a")
    short_b = ask(model, adapter_dirs, "v7", max_new=80, channel="b")
    again_a = ask(model, adapter_dirs, "c123-v4", max_new=10, length=30, channel="c")
    expected = [await alone(r) for r in (long_a, short_b, again_a)]
    first = scheduler.submit(long_a)
    await first_token(first)
    second = scheduler.submit(short_b)
    await first_token(second)
    third = scheduler.submit(again_a)  # waits: the batch holds two
    assert set(model.model.peft_config) == {"c123-v4", "v7"}
    outputs = [(await h.result()).token_ids for h in (first, second, third)]
    assert outputs == expected
    assert scheduler.adapters.loads == 2  # c123-v4 stayed loaded for the waiting request
    await scheduler.close()


async def test_an_adapter_that_cannot_be_loaded_fails_only_its_own_request(adapter_dirs, tmp_path):
    from tests.helpers.models import make_tiny_model

    model = make_tiny_model()
    scheduler = BatchingGenerator(model)
    good = scheduler.submit(ask(model, adapter_dirs, "v7", channel="a"))
    broken = ask(model, adapter_dirs, "v7", channel="b")
    broken.adapter, broken.adapter_path = "gone", str(tmp_path / "missing")
    bad = scheduler.submit(broken)
    with pytest.raises(GenerationFailed) as info:
        await bad.result()
    assert str(info.value) == ADAPTER_UNAVAILABLE
    assert len((await good.result()).token_ids) == 12
    await scheduler.close()


async def test_beam_search_beside_the_batch_gets_its_adapter_loaded(adapter_dirs):
    from tests.helpers.models import make_tiny_model

    beams = PRESETS["focused"].params.replace(max_new_tokens=6)
    model = make_tiny_model()
    request = ask(model, adapter_dirs, "c9-v1", params=beams)
    reference = SequentialGenerator(make_tiny_model())  # loads on demand itself
    expected = (await reference.submit(request).result()).token_ids
    await reference.close()
    scheduler = BatchingGenerator(model, SchedulerConfig(max_loaded_adapters=1))
    running = scheduler.submit(ask(model, adapter_dirs, "v7", max_new=40, channel="a"))
    output = await scheduler.submit(request).result()
    assert output.adapter == "c9-v1" and output.token_ids == expected
    await running.result()
    await scheduler.close()


async def test_the_sequential_generator_loads_on_demand_within_its_bound(adapter_dirs):
    from tests.helpers.models import make_tiny_model

    model = make_tiny_model()
    generator = SequentialGenerator(model, max_loaded_adapters=1)
    outputs = {}
    for name in ["c123-v4", "v7", "c123-v4"]:
        output = await generator.submit(ask(model, adapter_dirs, name)).result()
        assert output.adapter == name
        outputs.setdefault(name, output.token_ids)
        assert output.token_ids == outputs[name]
        assert set(model.model.peft_config) == {name}
    assert outputs["c123-v4"] != outputs["v7"]
    await generator.close()


async def test_loading_a_small_adapter_takes_milliseconds(adapter_dirs):
    from tests.helpers.models import make_tiny_model

    model = make_tiny_model()
    scheduler = BatchingGenerator(model)
    names = ["c123-v4", "v7", "c9-v1"]
    await asyncio.gather(
        *(scheduler.submit(ask(model, adapter_dirs, n, channel=n)).result() for n in names)
    )
    assert scheduler.adapters.loads == 3
    assert scheduler.adapters.load_seconds / 3 < 1.0  # generous: a shared CI machine
    await scheduler.close()
