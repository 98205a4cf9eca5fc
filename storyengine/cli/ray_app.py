"""`storyengine serve --ray`: the completion service as a Ray Serve deployment.

Each replica holds the model and a batching scheduler of its own, and answers the same
OpenAI-compatible protocol as `storyengine serve` (the same `CompletionService`: one
implementation of the protocol, carried here by Ray's HTTP proxy instead of aiohttp).
Adapters are loaded per replica through Ray Serve's model multiplexing: a client names
the adapter version in the `serve_multiplexed_model_id` header (Taleweaver's remote
generator does, beside the body's `model`), and Ray routes the request to a replica that
already holds it; a replica loads at most `STORY_MAX_LOADED_ADAPTERS`, the least
recently used going first. With `--max-replicas` above `--replicas`, Ray adds replicas
while each has more than `--target-requests` requests in flight.

Each answer says which replica wrote it and what that replica held
(`x-taleweaver-replica`, `x-taleweaver-adapters`), so routing can be checked from
outside.
"""

from __future__ import annotations

import os
import threading
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from ..config import Settings

MODEL_HEADER = "serve_multiplexed_model_id"
"""The header Ray Serve routes adapters by."""


@dataclass(frozen=True)
class Scaling:
    replicas: int = 2
    max_replicas: int | None = None
    """Above `replicas`: autoscale between the two."""
    target_requests: float = 8.0
    """Requests in flight per replica that autoscaling aims for."""
    cpus_per_replica: float = 1.0

    def deployment_options(self) -> dict[str, Any]:
        options: dict[str, Any] = {"ray_actor_options": {"num_cpus": self.cpus_per_replica}}
        if self.max_replicas is not None and self.max_replicas > self.replicas:
            options["autoscaling_config"] = {
                "min_replicas": self.replicas,
                "max_replicas": self.max_replicas,
                "target_ongoing_requests": self.target_requests,
            }
        else:
            options["num_replicas"] = self.replicas
        return options


class CompletionReplica:
    """One replica: a generator, its service, and the adapter registry (a database and
    an adapter directory every replica can read)."""

    def __init__(self, settings: Settings) -> None:
        from .models import load_generator

        self.settings = settings
        self.generator = load_generator(settings)
        self.service: Any = None
        self.store: Any = None
        self.name = f"{os.uname().nodename}:{os.getpid()}"

    async def _ready(self) -> Any:
        if self.service is None:
            from ..learning.registry import AdapterRegistry
            from ..serving.service import CompletionService
            from ..storage.store import Store

            registry = None
            if self.settings.has_database:
                self.store = await Store(self.settings.database).open()
                registry = AdapterRegistry(self.store, self.settings.adapter_dir)
            self.service = CompletionService(
                self.generator, defaults=self.settings.sampling, registry=registry
            )
            await self.service.sync_promoted()
        return self.service

    async def adapter(self, model_id: str) -> str | None:
        """Load the adapter `model_id` names into this replica (a one-token write
        through it, so the scheduler holds it); Ray keeps count of what each replica
        holds and routes by it."""
        from ..sampling import SamplingParams
        from ..serving.generation import GenerationRequest

        service = await self._ready()
        name, path = await service.resolve(model_id)
        if name is not None:
            request = GenerationRequest(
                prompt_ids=[0],
                params=SamplingParams(max_new_tokens=1, temperature=0.0),
                channel="ray-load",
                adapter=name,
                adapter_path=path,
            )
            await self.generator.submit(request).outcome()
        return name

    async def multiplexed_adapter(self, model_id: str) -> str | None:
        """`adapter`, through Ray's multiplexing (`build_app` decorates it)."""
        return await self.adapter(model_id)

    async def __call__(self, request: Any) -> Any:
        from ray import serve
        from starlette.responses import JSONResponse, StreamingResponse

        service = await self._ready()
        path, method = request.url.path.rstrip("/"), request.method
        headers = {"x-taleweaver-replica": self.name}
        try:
            if path.endswith("/health"):
                status, body = service.health_answer()
                return JSONResponse(body, status)
            if path.endswith("/v1/models") and method == "GET":
                return JSONResponse(await service.model_list(), headers=headers)
            if not (path.endswith("/v1/completions") and method == "POST"):
                return JSONResponse({"error": {"message": "Not found.", "code": 404}}, 404)
            if model_id := serve.get_multiplexed_model_id():
                await self.multiplexed_adapter(model_id)
            try:
                body = await request.json()
            except ValueError:
                from ..serving.service import RequestError

                raise RequestError(400, "The body is not valid JSON.") from None
            client = request.client.host if request.client else "?"
            pending = await service.begin(body, channel=client)
        except Exception as exc:
            status, answer = service.error_answer(exc)
            return JSONResponse(answer, status, headers=headers)
        headers["x-taleweaver-adapters"] = ",".join(sorted(service.loaded_adapters()))
        if pending.completion.stream:

            async def events() -> AsyncIterator[bytes]:
                try:
                    async for chunk in service.chunks(pending):
                        yield chunk
                finally:
                    service.finish(pending)  # the client went away: its rows stop

            return StreamingResponse(events(), media_type="text/event-stream", headers=headers)
        try:
            return JSONResponse(await service.whole(pending), headers=headers)
        finally:
            service.finish(pending)


def build_app(settings: Settings, scaling: Scaling) -> Any:
    """The Ray Serve application: `serve.run(build_app(...))`."""
    from ray import serve

    class Replica(CompletionReplica):
        @serve.multiplexed(max_num_models_per_replica=settings.max_loaded_adapters)
        async def multiplexed_adapter(self, model_id: str) -> str | None:
            return await self.adapter(model_id)

    deployment = serve.deployment(name="taleweaver", **scaling.deployment_options())(Replica)
    return deployment.bind(settings)


def run(settings: Settings, scaling: Scaling, host: str, port: int, stop: threading.Event) -> None:
    """Start Ray (a local instance, or the cluster RAY_ADDRESS names) and serve until
    `stop` is set; then take the deployment and a local Ray instance down."""
    import ray
    from ray import serve

    ray.init(include_dashboard=False, ignore_reinit_error=True)
    try:
        serve.start(http_options={"host": host, "port": port})
        serve.run(build_app(settings, scaling), route_prefix="/")
        print(f"serving on http://{host}:{port}/v1 with Ray Serve (Ctrl-C stops)", flush=True)
        stop.wait()
        serve.shutdown()
    finally:
        ray.shutdown()
