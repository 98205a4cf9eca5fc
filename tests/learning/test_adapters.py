"""The adapter registry and hot-swapping adapters in a running engine."""

import copy
import os
import subprocess
import sys

import pytest
import torch

from storyengine.errors import InvalidInput
from storyengine.learning.registry import AdapterRegistry, round_lock
from storyengine.records import Author
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.storage.store import Store
from storyengine.story.engine import StoryEngine

ANN = Author("1", "Ann")


def lora_saver(base_model, seed: int):
    """A function that saves a random (non-zero) LoRA adapter for `base_model`."""
    from peft import LoraConfig, get_peft_model

    def save(directory):
        torch.manual_seed(seed)
        model = get_peft_model(
            copy.deepcopy(base_model),
            LoraConfig(
                r=4,
                lora_alpha=8,
                target_modules=["c_attn"],
                fan_in_fan_out=True,
                init_lora_weights=False,
            ),
        )
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.data.normal_(0, 0.3)
        model.save_pretrained(directory)

    return save


@pytest.fixture
async def registry(tmp_path):
    store = await Store(tmp_path / "r.db").open()
    yield await AdapterRegistry(store, tmp_path / "adapters").open()
    await store.close()


async def test_versions_are_written_atomically(registry, tiny_model):
    def broken(directory):
        (directory / "adapter_model.safetensors").write_bytes(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        await registry.register(broken, method="kto")
    assert await registry.list() == []
    assert [p.name for p in registry.root.iterdir()] == []  # nothing half-written in place

    (registry.root / ".tmp-v0009-crashed").mkdir()  # as a killed trainer would leave it
    with round_lock(registry.root):  # a round is running: it may be writing that one
        await registry.open()
    assert (registry.root / ".tmp-v0009-crashed").exists()
    await registry.open()
    assert not (registry.root / ".tmp-v0009-crashed").exists()

    v1 = await registry.register(
        lora_saver(tiny_model.model, 1), method="kto", data_counts={"kto": 10}
    )
    assert v1.version == 1 and v1.status == "candidate" and v1.name == "v1"
    assert (v1.path / "adapter_config.json").is_file() and (v1.path / "taleweaver.json").is_file()
    assert v1.path.name == "v0001"


async def test_promote_and_rollback(registry, tiny_model):
    v1 = await registry.register(lora_saver(tiny_model.model, 1), method="kto")
    v2 = await registry.register(lora_saver(tiny_model.model, 2), method="dpo", parent_version=1)
    assert await registry.promoted() is None
    await registry.promote(v1.version)
    await registry.promote(v2.version)
    assert (await registry.promoted()).version == 2
    assert (await registry.get(1)).status == "retired"
    back = await registry.rollback()
    assert back.version == 1
    assert (await registry.get(2)).status == "rejected"
    assert await registry.rollback() is None  # back to the base model
    with pytest.raises(InvalidInput):
        await registry.rollback()
    with pytest.raises(InvalidInput):
        await registry.promote(99)


async def test_a_promoted_adapter_is_served_without_restart_and_rollback_restores(
    settings, bundled_model
):
    model = copy.copy(bundled_model)  # its own LoadedModel: adapters get attached to it
    model.model = copy.deepcopy(bundled_model.model)
    greedy = settings.sampling.replace(temperature=0.0, max_new_tokens=16)
    async with StoryEngine(
        settings.replace(sampling=greedy), generator=BatchingGenerator(model)
    ) as engine:
        await engine.start_story("c", "Once upon a time, a bear found honey.", author=ANN)

        async def retry():
            result = await engine.retry("c")
            return result.text, (await engine.store.generation(result.generation_id))["adapter_id"]

        base_text, base_adapter = await retry()
        assert base_adapter is None
        v1 = await engine.registry.register(lora_saver(bundled_model.model, 5), method="kto")
        await engine.registry.promote(v1.version)  # as `storyengine adapters promote` would
        v1_text, v1_adapter = await retry()
        assert v1_adapter == "v1" and v1_text != base_text

        await engine.registry.rollback()
        again_text, again_adapter = await retry()
        assert again_adapter is None and again_text == base_text


@pytest.mark.slow
async def test_adapters_command(registry, tiny_model, tmp_path):
    report = {
        "preference_accuracy": 0.7,
        "current_preference_accuracy": 0.5,
        "perplexity": 9.5,
        "base_perplexity": 9.2,
        "reasons": [],
    }
    await registry.register(lora_saver(tiny_model.model, 1), method="kto", metrics=report)
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    base = [sys.executable, "-m", "storyengine", "adapters"]
    where = ["--db", str(registry.store.path), "--dir", str(registry.root)]

    def run(*args):
        return subprocess.run(
            [*base, *args, *where], capture_output=True, text=True, env=env, timeout=120
        )

    listed = await asyncio_to_thread(run, "list")
    assert listed.stdout.startswith("v1 · candidate · kto · ")
    assert "accuracy 0.70 (was 0.50) · ppl 9.50 (base 9.20)" in listed.stdout
    promoted = await asyncio_to_thread(run, "promote", "1")
    assert promoted.returncode == 0 and "promoted v1" in promoted.stdout
    rolled = await asyncio_to_thread(run, "rollback")
    assert "now serving the base model" in rolled.stdout
    missing = await asyncio_to_thread(run, "promote", "7")
    assert (
        missing.returncode == 2
        and missing.stderr.strip() == "storyengine: error: There is no adapter version 7."
    )


async def asyncio_to_thread(fn, *args):
    import asyncio

    return await asyncio.to_thread(fn, *args)


async def test_a_served_adapter_can_be_evaluated_beside_serving(tiny_model, tmp_path):
    """Adapters loaded by the serving thread are inference tensors: evaluation must run
    them per call, not by switching the model's active adapter (which raised)."""
    from storyengine.learning.evaluation import perplexity
    from storyengine.sampling import SamplingParams
    from storyengine.serving.generation import GenerationRequest

    model = copy.copy(tiny_model)
    model.model = copy.deepcopy(tiny_model.model)
    lora_saver(tiny_model.model, 3)(tmp_path / "v1")
    generator = BatchingGenerator(model)
    await generator.use_adapter("v1", str(tmp_path / "v1"))
    request = GenerationRequest(
        model.encode("Once"), SamplingParams(max_new_tokens=4, temperature=0.0)
    )
    assert (await generator.submit(request).result()).adapter == "v1"
    text = ["Once upon a time there was a cat."]
    served, base = (
        perplexity(model.model, model.tokenizer, "v1", text),
        perplexity(model.model, model.tokenizer, None, text),
    )
    assert served != base
    await generator.close()


async def test_each_community_has_its_own_lineage_over_the_shared_one(registry, tiny_model):
    shared = await registry.register(lora_saver(tiny_model.model, 1), method="dpo")
    await registry.promote(shared.version)
    own = await registry.register(lora_saver(tiny_model.model, 2), method="dpo", community="g1")
    assert (await registry.serving("g1")).version == shared.version  # until it has its own
    await registry.promote(own.version)
    assert (await registry.serving("g1")).version == own.version
    assert (await registry.serving("g2")).version == shared.version  # others: the shared one
    assert (await registry.promoted()).version == shared.version  # not retired by g1's
    second = await registry.register(lora_saver(tiny_model.model, 3), method="dpo", community="g1")
    await registry.promote(second.version)
    assert [v.status for v in await registry.lineage("g1")] == ["retired", "promoted"]
    assert (await registry.rollback("g1")).version == own.version
    assert (await registry.rollback("g1")) is None  # back to the shared adapter
    assert (await registry.serving("g1")).version == shared.version
    with pytest.raises(InvalidInput, match="served the shared one"):
        await registry.rollback("g1")
