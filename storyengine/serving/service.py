"""`storyengine serve`: the generator behind HTTP, speaking the OpenAI-compatible
completions protocol that vLLM, SGLang and llama.cpp's server speak.

    POST /v1/completions   one prompt; whole, or streamed as server-sent events
    GET  /v1/models        the served model, `base`, and the registered adapter versions
    GET  /health           200 while the generator runs, else 503
    GET  /metrics          Prometheus: requests, queue depth, tokens, TTFT, adapters
    POST /v1/images/generations   a picture (OpenAI's images protocol, b64_json), when
                           STORY_IMAGE_MODEL is set: the storyteller's STORY_IMAGE_URL

`model` names what writes: the served model's id (or nothing) for the adapter being
served, `base` for the bare base model, or an adapter version (`v0003`). Beside
OpenAI's fields, the sampling fields vLLM accepts are taken: `top_k`,
`repetition_penalty`, `seed`, `min_tokens`, and Taleweaver's `no_repeat_ngram_size`.
Every request goes through the same scheduler as the stories (its `user` field, else
the client's address, is the "channel" that fairness shares capacity by). A client
that disconnects frees its slot at the next step. A request that cannot be served gets
a 4xx with a JSON error body, never a 500.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

from aiohttp import web

from ..errors import IllustratorBusy, InvalidInput, StoryError
from ..sampling import SamplingParams
from .generation import BASE_ADAPTER, GenerationRequest, Generator
from .images import PictureBackend, picture_request


class AdapterVersionInfo(Protocol):
    """One adapter version as the service needs to see it."""

    @property
    def name(self) -> str: ...

    @property
    def path(self) -> Path: ...


class AdapterRegistry(Protocol):
    """Where versions are looked up (the learning side's `AdapterRegistry` is one): the
    service only reads it."""

    async def list(self) -> list[Any]: ...

    async def get(self, version: int) -> AdapterVersionInfo | None: ...

    async def promoted(self) -> AdapterVersionInfo | None: ...


log = logging.getLogger(__name__)

MAX_N = 8
TTFT_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FINISH = {"eos": "stop", "length": "length", "cancelled": "abort"}
"""Our finish reasons as the protocol names them (vLLM says `abort` for a cancelled one)."""
SAMPLING_FIELDS = {
    # request field: (SamplingParams field, type)
    "temperature": ("temperature", float),
    "top_p": ("top_p", float),
    "top_k": ("top_k", int),
    "repetition_penalty": ("repetition_penalty", float),
    "no_repeat_ngram_size": ("no_repeat_ngram_size", int),
    "seed": ("seed", int),
    "max_tokens": ("max_new_tokens", int),
    "num_beams": ("num_beams", int),  # Taleweaver's: beam search (the `focused` preset)
    "length_penalty": ("length_penalty", float),
}
UNSUPPORTED = ("stop", "logprobs", "echo", "suffix", "logit_bias", "best_of")
"""Fields refused when set (rather than silently ignored): the client would be wrong
about what it got."""


class RequestError(Exception):
    """A request that cannot be served: its HTTP status and a message for the client."""

    def __init__(self, status: int, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.param = status, param


@dataclass
class ServiceMetrics:
    """What `/metrics` reports."""

    requests: dict[str, int] = field(default_factory=dict)
    """By outcome: ok, cancelled, invalid, not_found, failed."""
    prompt_tokens: int = 0
    completion_tokens: int = 0
    in_flight: int = 0
    ttft_buckets: list[int] = field(default_factory=lambda: [0] * len(TTFT_BUCKETS))
    ttft_count: int = 0
    ttft_sum: float = 0.0
    started: float = field(default_factory=time.monotonic)

    def count(self, outcome: str) -> None:
        self.requests[outcome] = self.requests.get(outcome, 0) + 1

    def observe_ttft(self, seconds: float) -> None:
        self.ttft_count += 1
        self.ttft_sum += seconds
        for i, bound in enumerate(TTFT_BUCKETS):
            if seconds <= bound:
                self.ttft_buckets[i] += 1


@dataclass(frozen=True)
class Completion:
    """One parsed `/v1/completions` request."""

    prompt_ids: list[int]
    params: SamplingParams
    min_tokens: int
    n: int
    stream: bool
    adapter: str | None
    adapter_path: str | None
    model: str
    channel: str
    token_ids: bool = False
    """Taleweaver's (and recent vLLM's) `return_token_ids`: each choice also carries the
    ids of the tokens it wrote (streamed: in the last event)."""


class CompletionService:
    """The HTTP side of a generator. `registry` (optional) resolves adapter versions;
    without one only the served model and `base` can be named."""

    def __init__(
        self,
        generator: Generator,
        *,
        defaults: SamplingParams | None = None,
        registry: AdapterRegistry | None = None,
        pictures: PictureBackend | None = None,
        picture_size: int = 512,
        picture_steps: int = 25,
    ) -> None:
        self.generator = generator
        self.pictures = pictures
        """What draws at /v1/images/generations (STORY_IMAGE_MODEL); None: not served."""
        self.picture_size, self.picture_steps = picture_size, picture_steps
        self.defaults = (defaults or SamplingParams()).replace(max_new_tokens=16, best_of=1)
        """OpenAI's default length (16 tokens) unless the request says; the rest as the
        storyteller samples."""
        self.registry = registry
        self.metrics = ServiceMetrics()
        self.model_id = generator.info.model_id
        self.serving: str | None = None
        """The adapter served by default (the registry's promoted one)."""
        self._sync_lock = asyncio.Lock()

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._errors_as_json])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_get("/v1/models", self.models)
        if self.pictures is not None:
            app.router.add_post("/v1/images/generations", self.images)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app

    # -- endpoints ----------------------------------------------------------------

    async def completions(self, request: web.Request) -> web.StreamResponse:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "The body is not valid JSON.") from None
        pending = await self.begin(body, channel=request.remote or "?")
        try:
            if not pending.completion.stream:
                return web.json_response(await self.whole(pending))
            response = web.StreamResponse(
                headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
            )
            await response.prepare(request)
            async for chunk in self.chunks(pending):
                await response.write(chunk)
            await response.write_eof()
            return response
        finally:
            self.finish(pending)  # a client gone before the end: its rows stop next step

    async def images(self, request: web.Request) -> web.Response:
        """OpenAI's images endpoint, for one picture as base64 (the protocol the
        storyteller's `STORY_IMAGE_URL` speaks)."""
        assert self.pictures is not None
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise RequestError(400, "The body is not valid JSON.") from None
        try:
            asked = picture_request(body, size=self.picture_size, steps=self.picture_steps)
        except ValueError as exc:
            message, param = exc.args
            raise RequestError(400, message, param) from None
        try:
            picture = await self.pictures.draw(asked)
        except IllustratorBusy as exc:
            return _error(429, str(exc))
        data = base64.b64encode(picture.data).decode("ascii")
        return web.json_response({"created": int(time.time()), "data": [{"b64_json": data}]})

    # -- one completion, whatever carries it (aiohttp here, Ray Serve in ray_app) ----

    async def begin(self, body: Any, *, channel: str) -> Pending:
        """Check a request body (raising `RequestError`) and submit it."""
        completion = await self.parse(body, fallback_channel=channel)
        handles = self.generator.submit_many(self._request(completion), completion.n)
        self.metrics.in_flight += len(handles)
        return Pending(completion, handles)

    def finish(self, pending: Pending) -> None:
        """Whatever happened: stop its rows (a finished one's stop is a no-op)."""
        for handle in pending.handles:
            handle.cancel()
        self.metrics.in_flight -= len(pending.handles)

    async def models(self, request: web.Request) -> web.Response:
        return web.json_response(await self.model_list())

    async def model_list(self) -> dict[str, Any]:
        """`GET /v1/models`: the served model, `base`, and the registered versions."""
        names = [self.model_id, "base"]
        if self.registry is not None:
            names += [v.name for v in await self.registry.list() if v.path.is_dir()]
        created, window = int(time.time()), self.generator.info.context_window
        return {
            "object": "list",
            "data": [
                {
                    "id": n,
                    "object": "model",
                    "created": created,
                    "owned_by": "taleweaver",
                    "max_model_len": window,
                }
                for n in names
            ],
        }

    async def health(self, request: web.Request) -> web.Response:
        status, body = self.health_answer()
        return web.json_response(body, status=status)

    def health_answer(self) -> tuple[int, dict[str, str]]:
        """`GET /health`: 200 while the generator runs, else 503."""
        alive = getattr(self.generator, "alive", True)
        return (200, {"status": "ok"}) if alive else (503, {"status": "down"})

    async def prometheus(self, request: web.Request) -> web.Response:
        m = self.metrics
        lines = [
            "# HELP taleweaver_serve_requests_total Completion requests by outcome.",
            "# TYPE taleweaver_serve_requests_total counter",
            *(
                f'taleweaver_serve_requests_total{{outcome="{k}"}} {v}'
                for k, v in sorted(m.requests.items())
            ),
            "# HELP taleweaver_serve_queue_depth Requests waiting to join the batch.",
            "# TYPE taleweaver_serve_queue_depth gauge",
            f"taleweaver_serve_queue_depth {getattr(self.generator, 'waiting', 0)}",
            "# HELP taleweaver_serve_in_flight Completions being written or waiting.",
            "# TYPE taleweaver_serve_in_flight gauge",
            f"taleweaver_serve_in_flight {m.in_flight}",
            "# HELP taleweaver_serve_tokens_total Tokens read (prompt) and written.",
            "# TYPE taleweaver_serve_tokens_total counter",
            f'taleweaver_serve_tokens_total{{kind="prompt"}} {m.prompt_tokens}',
            f'taleweaver_serve_tokens_total{{kind="completion"}} {m.completion_tokens}',
            "# HELP taleweaver_serve_tokens_per_second Completion tokens per second since start.",
            "# TYPE taleweaver_serve_tokens_per_second gauge",
            "taleweaver_serve_tokens_per_second "
            f"{m.completion_tokens / max(time.monotonic() - m.started, 1e-9):.3f}",
            "# HELP taleweaver_serve_ttft_seconds Time to the first token.",
            "# TYPE taleweaver_serve_ttft_seconds histogram",
            *(
                f'taleweaver_serve_ttft_seconds_bucket{{le="{bound}"}} {count}'
                for bound, count in zip(TTFT_BUCKETS, m.ttft_buckets, strict=True)
            ),
            f'taleweaver_serve_ttft_seconds_bucket{{le="+Inf"}} {m.ttft_count}',
            f"taleweaver_serve_ttft_seconds_sum {m.ttft_sum:.6f}",
            f"taleweaver_serve_ttft_seconds_count {m.ttft_count}",
            "# HELP taleweaver_serve_loaded_adapters Adapters loaded for serving.",
            "# TYPE taleweaver_serve_loaded_adapters gauge",
            f"taleweaver_serve_loaded_adapters {self._loaded_adapters()}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    # -- parsing ------------------------------------------------------------------

    async def parse(self, body: Any, *, fallback_channel: str) -> Completion:
        """A request body → a `Completion`, or `RequestError` saying what is wrong."""
        if not isinstance(body, dict):
            raise RequestError(400, "The body must be a JSON object.")
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str | list):
            prompt = prompt[0]  # a batch of one
        info = self.generator.info
        if isinstance(prompt, str) and prompt:
            ids = info.encode(prompt)
        elif _token_ids(prompt):  # the protocol's other form: the prompt as token ids
            ids = [int(t) for t in cast(list[int], prompt)]
        else:
            raise RequestError(
                400, "`prompt` must be one non-empty string, or one list of token ids.", "prompt"
            )
        for name in UNSUPPORTED:
            if body.get(name) not in (None, False, [], ""):
                raise RequestError(400, f"`{name}` is not supported by this server.", name)
        changes: dict[str, Any] = {}
        for name, (target, kind) in SAMPLING_FIELDS.items():
            value = body.get(name)
            if value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise RequestError(400, f"`{name}` must be a number.", name)
            if kind is int and value != int(value):
                raise RequestError(400, f"`{name}` must be a whole number.", name)
            changes[target] = kind(value)
        if changes.get("top_k") == -1:  # vLLM's "off"
            changes["top_k"] = 0
        try:
            params = self.defaults.replace(**changes)
        except InvalidInput as exc:
            raise RequestError(400, str(exc)) from None
        min_tokens = _whole_number(body, "min_tokens", 0, 0, params.max_new_tokens)
        n = _whole_number(body, "n", 1, 1, MAX_N)
        stream = body.get("stream", False)
        if not isinstance(stream, bool):
            raise RequestError(400, "`stream` must be true or false.", "stream")
        if stream and n > 1:
            raise RequestError(400, "Streaming returns one choice: use n = 1.", "n")
        user = body.get("user")
        channel = user if isinstance(user, str) and user else fallback_channel
        model = body.get("model") or self.model_id
        if not isinstance(model, str):
            raise RequestError(400, "`model` must be a string.", "model")
        adapter, path = await self._adapter(model)
        room = info.context_window - params.max_new_tokens
        if len(ids) > room:
            raise RequestError(
                400,
                f"This model's maximum context length is {info.context_window} tokens; the "
                f"prompt has {len(ids)} and max_tokens asks for {params.max_new_tokens}.",
                "prompt",
            )
        token_ids = body.get("return_token_ids", False)
        if not isinstance(token_ids, bool):
            raise RequestError(400, "`return_token_ids` must be true or false.", "return_token_ids")
        return Completion(
            ids, params, min_tokens, n, stream, adapter, path, model, channel, token_ids
        )

    async def _adapter(self, model: str) -> tuple[str | None, str | None]:
        if model == self.model_id:
            await self.sync_promoted()
            return None, None  # what is being served
        if model == "base":
            return BASE_ADAPTER, None
        if model in self._loaded_names():  # loaded when the service started
            return model, None
        number = model.lower().removeprefix("v")
        if self.registry is not None and number.isdigit():
            version = await self.registry.get(int(number))
            if version is not None and version.path.is_dir():
                return version.name, str(version.path)
        raise RequestError(404, f"The model `{model}` does not exist.", "model")

    def _request(self, completion: Completion) -> GenerationRequest:
        return GenerationRequest(
            completion.prompt_ids,
            completion.params,
            channel=f"api:{completion.channel}",
            adapter=completion.adapter,
            min_new_tokens=completion.min_tokens,
            adapter_path=completion.adapter_path,
        )

    async def sync_promoted(self) -> None:
        """Serve the registry's promoted adapter by default, as the engine does: a
        promotion made elsewhere (a training round, `adapters promote`) is picked up by
        the next request; those in flight finish on the adapter they began with."""
        if self.registry is None:
            return
        async with self._sync_lock:
            promoted = await self.registry.promoted()
            wanted = promoted.name if promoted is not None else None
            if wanted != self.serving:
                path = str(promoted.path) if promoted is not None else None
                await self.generator.use_adapter(wanted, path)
                self.serving = wanted
                log.info("serving adapter %s by default", wanted or "none (the base model)")

    # -- answering ----------------------------------------------------------------

    async def whole(self, pending: Pending) -> dict[str, Any]:
        """The answer in one piece (every choice)."""
        completion, handles = pending.completion, pending.handles
        outputs = [await h.outcome() for h in handles]  # cancelled ones too: what they wrote
        choices = []
        for index, output in enumerate(outputs):
            self._account(output)
            choice = {
                "index": index,
                "text": output.text,
                "logprobs": None,
                "finish_reason": FINISH[output.finish_reason],
            }
            if completion.token_ids:
                choice["token_ids"] = output.token_ids
            choices.append(choice)
        completion_tokens = sum(len(o.token_ids) for o in outputs)
        return {
            **self._envelope(completion),
            "choices": choices,
            "usage": {
                "prompt_tokens": len(completion.prompt_ids),
                "completion_tokens": completion_tokens,
                "total_tokens": len(completion.prompt_ids) + completion_tokens,
            },
        }

    async def chunks(self, pending: Pending) -> AsyncIterator[bytes]:
        """The answer as server-sent events, as the text grows (the first choice)."""
        completion, handle = pending.completion, pending.handles[0]
        envelope = self._envelope(completion)
        sent = ""

        def event(text: str, finish: str | None, **extra: Any) -> bytes:
            choice = {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}
            return f"data: {json.dumps({**envelope, 'choices': [choice | extra]})}\n\n".encode()

        async for text in handle.stream():
            # Hold back a half-decoded character (shown as U+FFFD) until it is whole.
            ready = text.rstrip("\ufffd")
            if ready.startswith(sent) and len(ready) > len(sent):
                yield event(ready[len(sent) :], None)
                sent = ready
        output = await handle.outcome()
        self._account(output)
        tail = output.text[len(sent) :] if output.text.startswith(sent) else ""
        extra = {"token_ids": output.token_ids} if completion.token_ids else {}
        yield event(tail, FINISH[output.finish_reason], **extra)
        yield b"data: [DONE]\n\n"

    def _envelope(self, completion: Completion) -> dict[str, Any]:
        return {
            "id": f"cmpl-{uuid.uuid4().hex}",
            "object": "text_completion",
            "created": int(time.time()),
            "model": completion.model,
        }

    def _account(self, output: Any) -> None:
        self.metrics.count("cancelled" if output.finish_reason == "cancelled" else "ok")
        self.metrics.prompt_tokens += output.prompt_tokens
        self.metrics.completion_tokens += len(output.token_ids)
        if output.ttft_s is not None:
            self.metrics.observe_ttft(output.ttft_s)

    def loaded_adapters(self) -> set[str]:
        """The adapters the generator holds now."""
        return self._loaded_names()

    async def resolve(self, model: str) -> tuple[str | None, str | None]:
        """What a request's `model` names: (adapter name, its directory), or raises a
        404 `RequestError`."""
        return await self._adapter(model)

    def _loaded_names(self) -> set[str]:
        model = getattr(self.generator, "model", None)
        config = getattr(getattr(model, "model", None), "peft_config", None)
        return set(config) if config else set()

    def _loaded_adapters(self) -> int:
        return len(self._loaded_names())

    @web.middleware
    async def _errors_as_json(
        self, request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:  # aiohttp's own: unknown path, wrong method, too big
            if exc.status >= 400:
                return _error(exc.status, exc.reason)
            raise
        except (ConnectionResetError, asyncio.CancelledError):
            self.metrics.count("cancelled")
            raise
        except Exception as exc:
            status, body = self.error_answer(exc)
            return web.json_response(body, status=status)

    def error_answer(self, exc: Exception) -> tuple[int, dict[str, Any]]:
        """What a request that failed with `exc` is answered: a 4xx for what the client
        can fix, a 503 for the generator's failures, never a 500; counted."""
        if isinstance(exc, RequestError):
            self.metrics.count("not_found" if exc.status == 404 else "invalid")
            return exc.status, error_body(exc.status, str(exc), exc.param)
        self.metrics.count("failed")
        if isinstance(exc, StoryError):  # the generator refused or failed this request
            status = 503 if "shutting down" in str(exc) else 422
            return status, error_body(status, str(exc))
        log.error("completion failed", exc_info=exc)
        return 503, error_body(503, "The generator failed on this request; it has been logged.")


@dataclass
class Pending:
    """A completion submitted: what was asked, and its rows' handles."""

    completion: Completion
    handles: list[Any]


def _token_ids(value: Any) -> bool:
    return (
        isinstance(value, list)
        and bool(value)
        and all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value)
    )


def _whole_number(body: dict[str, Any], name: str, default: int, low: int, high: int) -> int:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(400, f"`{name}` must be a whole number from {low} to {high}.", name)
    return value


def error_body(status: int, message: str, param: str | None = None) -> dict[str, Any]:
    """OpenAI's error shape."""
    default = "invalid_request_error" if status < 500 else "server_error"
    kind = {404: "not_found_error"}.get(status, default)
    return {"error": {"message": message, "type": kind, "param": param, "code": status}}


def _error(status: int, message: str, param: str | None = None) -> web.Response:
    return web.json_response(error_body(status, message, param), status=status)


async def serve(
    service: CompletionService, host: str, port: int, *, ready: Callable[[int], None] | None = None
) -> None:
    """Serve until cancelled. A client that disconnects cancels its handler (and so its
    rows), which aiohttp does only when asked (`handler_cancellation`)."""
    runner = web.AppRunner(service.app(), handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1] if runner.addresses else port  # port 0: the one given
    if ready is not None:
        ready(bound)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
