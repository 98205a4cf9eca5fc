"""`storyengine serve --ray`: the completion service as a Ray Serve deployment, on a
local Ray instance on the CPU with two replicas and two adapters."""

import asyncio
import json
import socket

import aiohttp
import pytest

from storyengine.config import Settings
from storyengine.learning.registry import AdapterRegistry
from storyengine.storage.store import Store
from tests.learning.test_adapters import lora_saver

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
async def ray_service(tmp_path, bundled_model):
    ray = pytest.importorskip("ray")
    from ray import serve

    from storyengine.cli.ray_app import Scaling, build_app

    store = await Store(tmp_path / "stories.db").open()
    registry = AdapterRegistry(store, tmp_path / "adapters")
    await registry.open()
    for seed in (1, 2):
        await registry.register(lora_saver(bundled_model.model, seed), method="dpo")
    await store.close()
    settings = Settings(
        db_path=tmp_path / "stories.db",
        adapter_dir=tmp_path / "adapters",
        device="cpu",
        max_loaded_adapters=1,  # a replica holds one: routing has to matter
    )
    port = free_port()

    def start() -> None:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app(settings, Scaling(replicas=2, cpus_per_replica=0.5)), route_prefix="/")

    await asyncio.to_thread(start)
    try:
        async with aiohttp.ClientSession(f"http://127.0.0.1:{port}") as http:
            yield http
    finally:
        await asyncio.to_thread(serve.shutdown)
        await asyncio.to_thread(ray.shutdown)


async def complete(http, model: str, **more) -> tuple[int, dict, dict]:
    body = {"model": model, "prompt": "Once upon a time", "max_tokens": 8, "temperature": 0}
    headers = {"serve_multiplexed_model_id": model}
    async with http.post("/v1/completions", json=body | more, headers=headers) as response:
        return response.status, dict(response.headers), await response.json()


async def test_two_replicas_answer_two_adapters_each_from_a_replica_holding_it(ray_service):
    http = ray_service
    answers = []
    for model in ["v1", "v2"] * 3:
        status, headers, body = await complete(http, model)
        assert status == 200, body
        assert body["model"] == model and body["choices"][0]["text"]
        held = headers["x-taleweaver-adapters"].split(",")
        assert model in held, (model, headers)  # answered where the adapter is loaded
        answers.append((model, headers["x-taleweaver-replica"], body["choices"][0]["text"]))
    # Greedy: each adapter writes the same words wherever it is served.
    assert len({text for model, _, text in answers if model == "v1"}) == 1
    assert len({text for model, _, text in answers if model == "v2"}) == 1

    async with http.post(
        "/v1/completions",
        json={"model": "v1", "prompt": "Once", "max_tokens": 4, "stream": True},
        headers={"serve_multiplexed_model_id": "v1"},
    ) as response:
        events = [line async for line in response.content if line.startswith(b"data:")]
    assert events[-1].strip() == b"data: [DONE]"
    assert json.loads(events[-2].removeprefix(b"data:"))["choices"][0]["finish_reason"]

    status, _, body = await complete(http, "v9")
    assert status == 404 and body["error"]["code"] == 404
    async with http.post("/v1/completions", data=b"{not json") as response:
        assert response.status == 400
    async with http.get("/v1/models") as response:
        names = [m["id"] for m in (await response.json())["data"]]
    assert {"base", "v1", "v2"} <= set(names)
