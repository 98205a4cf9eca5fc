"""`storyengine serve`: the OpenAI-compatible completions service, over real HTTP, on
the batching scheduler with the tiny random GPT-2 (the words do not matter here)."""

from __future__ import annotations

import asyncio
import contextlib
import io
import json
import os
import re
import signal
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
from PIL import Image

from storyengine.learning.registry import AdapterRegistry
from storyengine.serving.scheduler import BatchingGenerator
from storyengine.serving.service import CompletionService, serve
from storyengine.storage.store import Store
from tests.helpers.models import make_tiny_model
from tests.learning.test_adapters import lora_saver

PROMPT = "Once upon a time, a little fox lived by the river."


class Service:
    def __init__(self, service: CompletionService, http: aiohttp.ClientSession) -> None:
        self.service, self.http = service, http

    async def complete(self, **body) -> tuple[int, dict]:
        async with self.http.post("/v1/completions", json=body) as response:
            return response.status, await response.json()


@pytest.fixture
async def api(tmp_path):
    model = make_tiny_model(n_positions=1024)
    generator = BatchingGenerator(model)
    store = await Store(tmp_path / "serve.db").open()
    registry = AdapterRegistry(store, tmp_path / "adapters")
    await registry.open()
    await registry.register(lora_saver(model.model, 3), method="dpo")
    service = CompletionService(generator, registry=registry)
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(service, "127.0.0.1", 0, ready=port.set_result))
    async with aiohttp.ClientSession(f"http://127.0.0.1:{await port}") as http:
        yield Service(service, http)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await generator.close()
    await store.close()


async def test_a_completion_whole_and_streamed_is_the_same_text(api):
    body = {"prompt": PROMPT, "max_tokens": 12, "min_tokens": 12, "seed": 5, "temperature": 0.9}
    status, whole = await api.complete(**body)
    assert status == 200, whole
    assert whole["object"] == "text_completion" and whole["model"] == "test:tiny-gpt2"
    choice = whole["choices"][0]
    assert choice["finish_reason"] == "length" and choice["text"]
    assert whole["usage"]["completion_tokens"] == 12
    assert whole["usage"]["total_tokens"] == whole["usage"]["prompt_tokens"] + 12

    events = []
    async with api.http.post("/v1/completions", json={**body, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        async for line in response.content:
            if line.strip():
                events.append(line.decode().removeprefix("data: ").strip())
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert "".join(c["choices"][0]["text"] for c in chunks) == choice["text"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert all(c["choices"][0]["finish_reason"] is None for c in chunks[:-1])


async def test_n_choices_and_adapters_by_name(api):
    status, three = await api.complete(prompt=PROMPT, max_tokens=8, n=3, seed=1)
    assert status == 200 and [c["index"] for c in three["choices"]] == [0, 1, 2]
    assert len({c["text"] for c in three["choices"]}) > 1  # each its own seed

    greedy = {"prompt": PROMPT, "max_tokens": 8, "min_tokens": 8, "temperature": 0}
    _, served = await api.complete(**greedy)
    _, base = await api.complete(**greedy, model="base")
    _, adapter = await api.complete(**greedy, model="v1")
    assert served["choices"][0]["text"] == base["choices"][0]["text"]  # nothing promoted
    assert adapter["choices"][0]["text"] != base["choices"][0]["text"]
    assert adapter["model"] == "v1"

    async with api.http.get("/v1/models") as response:
        names = [m["id"] for m in (await response.json())["data"]]
    assert names == ["test:tiny-gpt2", "base", "v1"]


@pytest.mark.parametrize(
    "body, status, param",
    [
        ({"prompt": PROMPT, "temperature": 5}, 400, None),
        ({"prompt": PROMPT, "temperature": "hot"}, 400, "temperature"),
        ({"prompt": ""}, 400, "prompt"),
        ({"prompt": ["one", "two"]}, 400, "prompt"),
        ({}, 400, "prompt"),
        ({"prompt": PROMPT, "max_tokens": 0}, 400, None),
        ({"prompt": PROMPT, "max_tokens": 1.5}, 400, "max_tokens"),
        ({"prompt": PROMPT, "n": 99}, 400, "n"),
        ({"prompt": PROMPT, "n": 2, "stream": True}, 400, "n"),
        ({"prompt": PROMPT, "stream": "yes"}, 400, "stream"),
        ({"prompt": PROMPT, "stop": ["\n"]}, 400, "stop"),
        ({"prompt": PROMPT, "min_tokens": 500}, 400, "min_tokens"),
        ({"prompt": PROMPT * 90, "max_tokens": 16}, 400, "prompt"),  # past the context
        ({"prompt": PROMPT, "model": "v9"}, 404, "model"),
        ({"prompt": PROMPT, "model": "gpt-4"}, 404, "model"),
        ({"prompt": PROMPT, "model": 7}, 400, "model"),
    ],
)
async def test_bad_requests_get_a_4xx_with_a_json_error(api, body, status, param):
    got, answer = await api.complete(**body)
    assert got == status, answer
    assert answer["error"]["message"] and answer["error"]["param"] == param


async def test_what_is_not_a_completion_request_is_refused_in_json(api):
    async with api.http.post("/v1/completions", data=b"{not json") as response:
        assert response.status == 400
        assert "JSON" in (await response.json())["error"]["message"]
    async with api.http.post("/v1/completions", json=[1, 2]) as response:
        assert response.status == 400
    async with api.http.get("/v1/completions") as response:
        assert response.status == 405 and "error" in await response.json()
    async with api.http.get("/v2/anything") as response:
        assert response.status == 404 and "error" in await response.json()


async def test_a_client_that_goes_away_frees_its_slot(api):
    generator = api.service.generator
    submitted = []
    submit_many = generator.submit_many

    def watched(request, n):  # the real scheduler; the test keeps the handles to look at
        submitted.extend(handles := submit_many(request, n))
        return handles

    generator.submit_many = watched
    body = {"prompt": PROMPT, "max_tokens": 500, "min_tokens": 500, "stream": True}
    async with api.http.post("/v1/completions", json=body) as response:
        assert response.status == 200
        await response.content.readline()  # the first event: it is being written
    # The connection is closed here, long before 500 tokens.
    output = await asyncio.wait_for(submitted[0].outcome(), 10)
    assert output.finish_reason == "cancelled" and len(output.token_ids) < 500
    status, answer = await api.complete(prompt=PROMPT, max_tokens=4)  # and the next one runs
    assert status == 200, answer

    # A whole (not streamed) request whose client gives up is cancelled too.
    slow = {"prompt": PROMPT, "max_tokens": 500, "min_tokens": 500}
    with pytest.raises(asyncio.TimeoutError):
        async with api.http.post(
            "/v1/completions", json=slow, timeout=aiohttp.ClientTimeout(total=0.2)
        ) as response:
            await response.read()
    output = await asyncio.wait_for(submitted[-1].outcome(), 10)
    assert output.finish_reason == "cancelled" and len(output.token_ids) < 500


async def test_health_and_metrics(api):
    async with api.http.get("/health") as response:
        assert response.status == 200 and (await response.json())["status"] == "ok"
    await api.complete(prompt=PROMPT, max_tokens=6, min_tokens=6)
    await api.complete(prompt=PROMPT, temperature=9)
    async with api.http.get("/metrics") as response:
        text = await response.text()
    assert 'taleweaver_serve_requests_total{outcome="ok"} 1' in text
    assert 'taleweaver_serve_requests_total{outcome="invalid"} 1' in text
    assert 'taleweaver_serve_tokens_total{kind="completion"} 6' in text
    assert "taleweaver_serve_ttft_seconds_count 1" in text
    assert "taleweaver_serve_queue_depth 0" in text
    await api.service.generator.close()
    async with api.http.get("/health") as response:
        assert response.status == 503


def clean_env(**more: str) -> dict[str, str]:
    """This process's environment without its STORY_ settings, offline, on the CPU."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("STORY_")}
    return {**env, "HF_HUB_OFFLINE": "1", "STORY_DEVICE": "cpu", **more}


@contextlib.asynccontextmanager
async def served(data_dir: Path, **env: str) -> AsyncIterator[str]:
    """`storyengine serve --port 0` as a user runs it: its URL, from the line it
    prints; on the way out, SIGTERM, and it must stop cleanly."""
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "storyengine",
        "serve",
        "--port",
        "0",
        env=clean_env(STORY_DATA_DIR=str(data_dir), **env),
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        line = b""
        while b"serving" not in line:
            line = await asyncio.wait_for(process.stderr.readline(), 120)
        yield re.search(rb"http://\S+/v1", line).group().decode()
    finally:
        process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(process.wait(), 30)
    assert code == 0


async def test_the_serve_command_answers_and_stops_on_sigterm(tmp_path):
    async with served(tmp_path) as url, aiohttp.ClientSession() as http:
        body = {"prompt": PROMPT, "max_tokens": 8, "seed": 1}
        async with http.post(url + "/completions", json=body) as response:
            answer = await response.json()
    assert response.status == 200 and answer["model"] == "bundled:tinystories-gpt2"
    assert not (tmp_path / "taleweaver.db").exists()  # serving never makes a database


async def test_the_serve_command_draws_pictures_for_a_remote_storyteller(tmp_path):
    """STORY_IMAGE_MODEL on the serving machine, STORY_IMAGE_URL on the bot's: the
    remote backend against `storyengine serve`'s images endpoint."""
    from storyengine.serving.images import PictureRequest, RemotePictures, media_type
    from tests.helpers.pictures import tiny_pipeline

    pipeline = tiny_pipeline(tmp_path / "pipeline")
    env = {"STORY_IMAGE_MODEL": str(pipeline), "STORY_IMAGE_STEPS": "2", "STORY_IMAGE_SIZE": "32"}
    async with served(tmp_path, **env) as url, aiohttp.ClientSession() as http:
        pictures = RemotePictures(url)
        try:
            drawn = await pictures.draw(PictureRequest("a red fox", 32, 40, seed=3))
            again = await pictures.draw(PictureRequest("a red fox", 32, 40, seed=3))
        finally:
            await pictures.close()
        assert media_type(drawn.data) == "image/png" and drawn.data == again.data  # seeded
        assert Image.open(io.BytesIO(drawn.data)).size == (32, 40)
        for body, param in [
            ({"prompt": ""}, "prompt"),
            ({"prompt": "a fox", "n": 2}, "n"),
            ({"prompt": "a fox", "size": "big"}, "size"),
            ({"prompt": "a fox", "size": "30x30"}, "size"),
            ({"prompt": "a fox", "response_format": "url"}, "response_format"),
            ({"prompt": "a fox", "seed": -1}, "seed"),
        ]:
            async with http.post(url + "/images/generations", json=body) as response:
                answer = await response.json()
            assert response.status == 400 and answer["error"]["param"] == param, answer


async def test_pictures_are_not_served_unless_configured(api):
    async with api.http.post("/v1/images/generations", json={"prompt": "a fox"}) as response:
        assert response.status == 404
