"""The engine on a generation service (`STORY_GENERATOR_URL`): a real `storyengine
serve` service in the same process (the tiny random GPT-2 behind it), reached over
HTTP by the `RemoteGenerator`, compared with the same model served in process."""

from __future__ import annotations

import asyncio
import sqlite3
import sys

import aiohttp
import pytest

from storyengine.config import Settings
from storyengine.errors import ConfigError, GenerationFailed
from storyengine.learning.registry import AdapterRegistry
from storyengine.records import Author
from storyengine.sampling import SamplingParams
from storyengine.serving.generation import GenerationRequest
from storyengine.serving.remote import connect
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.serving.service import CompletionService, serve
from storyengine.storage.store import Store
from storyengine.story.engine import StoryEngine
from tests.helpers.models import make_tiny_model
from tests.learning.test_adapters import lora_saver
from tests.serving.test_serve import clean_env, served

ANN = Author("u1", "Ann")
PREMISE = "Once upon a time, a little fox lived at the edge of a big wood."
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)


@pytest.fixture
async def service(tmp_path):
    """A completions service on the tiny model, with the adapter registry the engine
    uses too (a path both would mount)."""
    model = make_tiny_model(n_positions=1024)
    generator = BatchingGenerator(model)
    store = await Store(tmp_path / "stories.db").open()
    registry = await AdapterRegistry(store, tmp_path / "adapters").open()
    service = CompletionService(generator, registry=registry)
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, "127.0.0.1", 0, ready=port.set_result))
    service.url = f"http://127.0.0.1:{await port}/v1"
    service.registry_store = store
    yield service
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await generator.close()
    await store.close()


def settings_for(tmp_path, url: str | None = None) -> Settings:
    return Settings(
        db_path=tmp_path / "stories.db",
        adapter_dir=tmp_path / "adapters",
        device="cpu",
        sampling=GREEDY,
        generator_url=url,
    )


async def test_a_story_told_through_the_service_is_the_one_told_in_process(service, tmp_path):
    remote = await asyncio.to_thread(connect, settings_for(tmp_path, service.url))
    assert remote.info.model_id == "test:tiny-gpt2" and remote.info.context_window == 1024
    async with StoryEngine(settings_for(tmp_path / "r"), generator=remote) as engine:
        assert engine.narrator.local_model is None
        told = [
            (await engine.start_story("c1", PREMISE, author=ANN)).text,
            (await engine.continue_story("c1", ANN, "The fox found a key.")).text,
        ]
        retried = await engine.retry("c1", by=ANN)
        assert retried.text  # greedy: the same words again, kept as an alternative
    local = BatchingGenerator(make_tiny_model(n_positions=1024))
    async with StoryEngine(settings_for(tmp_path / "l"), generator=local) as engine:
        expected = [
            (await engine.start_story("c1", PREMISE, author=ANN)).text,
            (await engine.continue_story("c1", ANN, "The fox found a key.")).text,
        ]
    assert told == expected


async def test_a_cancelled_request_frees_the_services_slot(service, tmp_path):
    remote = await asyncio.to_thread(connect, settings_for(tmp_path, service.url))
    ids = remote.info.encode(PREMISE)
    long = SamplingParams(max_new_tokens=500, seed=1)
    handle = remote.submit(GenerationRequest(ids, long, channel="c", min_new_tokens=500))
    async for text in handle.stream():
        if text:
            break  # it is being written
    handle.cancel()
    output = await asyncio.wait_for(handle.outcome(), 10)
    assert output.finish_reason == "cancelled" and len(output.token_ids) < 500
    served = service.generator
    for _ in range(200):  # the service notices the closed connection at its next step
        if served.running == 0:
            break
        await asyncio.sleep(0.05)
    assert served.running == 0
    await remote.close()


async def test_adapters_reach_the_service_by_version(service, tmp_path):
    registry = AdapterRegistry(service.registry_store, tmp_path / "adapters")
    version = await registry.register(lora_saver(service.generator.model.model, 4), method="dpo")
    remote = await asyncio.to_thread(connect, settings_for(tmp_path, service.url))
    ids = remote.info.encode(PREMISE)

    async def write(adapter):
        request = GenerationRequest(ids, GREEDY, adapter=adapter, min_new_tokens=12)
        return (await remote.submit(request).result()).text

    base = await write(None)
    assert await write(version.name) != base
    await registry.promote(version.version)  # elsewhere: the service picks it up
    assert await write(None) == await write(version.name)
    with pytest.raises(GenerationFailed, match="does not exist"):
        await write("v99")
    await remote.close()


async def test_a_service_that_does_not_answer_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigError, match=r"^STORY_GENERATOR_URL: no completions service"):
        await asyncio.to_thread(connect, settings_for(tmp_path, "http://127.0.0.1:9/v1"))
    with pytest.raises(ConfigError, match=r"^STORY_GENERATOR_URL"):
        Settings(generator_url="gpu-box:8000")


async def test_a_whole_chat_session_through_a_served_model(tmp_path):
    """`storyengine serve` in one process, `storyengine chat` in another, as a user
    would run them: the bundled model behind HTTP."""
    async with served(tmp_path / "server") as url:
        chat = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "storyengine",
            "chat",
            env=clean_env(
                STORY_DATA_DIR=str(tmp_path / "client"),
                STORY_GENERATOR_URL=url,
                STORY_MAX_NEW_TOKENS="24",
            ),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        script = (
            b"/start Once upon a time, a fox found a key.\nThe fox opened a door.\n/retry\n/quit\n"
        )
        out, err = await asyncio.wait_for(chat.communicate(script), 180)
        assert chat.returncode == 0, err.decode()
        text = out.decode()
        assert not [line for line in text.splitlines() if line.startswith("! ")], text
        assert "Traceback" not in err.decode()
        rows = sqlite3.connect(tmp_path / "client" / "taleweaver.db").execute(
            "SELECT kind, text, status FROM turns ORDER BY id"
        )
        turns = [(kind, status) for kind, _, status in rows]
        # opening, the line, its reply; the retry replaced the reply with a new one
        assert turns == [
            ("bot", "active"),
            ("user", "active"),
            ("bot", "replaced"),
            ("bot", "active"),
        ]
        async with aiohttp.ClientSession() as http, http.get(url[:-3] + "/metrics") as response:
            metrics = await response.text()
        assert 'taleweaver_serve_requests_total{outcome="ok"} 3' in metrics
