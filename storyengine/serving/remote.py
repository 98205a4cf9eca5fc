"""A generator that runs the model elsewhere: an OpenAI-compatible completions service
(`storyengine serve`, vLLM, SGLang, llama.cpp's server), at `STORY_GENERATOR_URL`.

Only the tokenizer lives here (the engine counts tokens to fit the context window, and
sends the prompt as token ids, so that the service reads exactly what the engine built).
Each request streams (server-sent events) into its `GenerationHandle` as a local
generator's would; cancelling the handle closes the connection, which a service frees
at its next step. Adapters are named by version (`model: "v3"`, or `"base"`); the
service loads them from its own registry. Sampling fields beyond OpenAI's are the ones
vLLM accepts (`top_k`, `repetition_penalty`, `seed`, `min_tokens`) and Taleweaver's own
(`no_repeat_ngram_size`, `num_beams`, `length_penalty`), which other servers may ignore.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import ConfigError, GenerationFailed
from .generation import (
    BASE_ADAPTER,
    GenerationHandle,
    GenerationOutput,
    GenerationRequest,
    candidate_requests,
    empty_output,
)
from .modeling import TokenizedText, load_tokenizer

if TYPE_CHECKING:
    import aiohttp

    from ..config import Settings

log = logging.getLogger(__name__)

FINISH = {"stop": "eos", "length": "length", "abort": "cancelled"}


@dataclass
class RemoteModelInfo(TokenizedText):
    """The served model as the engine needs to know it: a local tokenizer (its text
    and tokens as a local model's), the service's context window and model id."""

    model_id: str
    context_window: int
    tokenizer: Any
    url: str

    def describe(self) -> str:
        return f"the service at {self.url}"


def connect(settings: Settings, *, timeout_s: float = 10.0) -> RemoteGenerator:
    """Ask the service what it serves (`GET /v1/models`) and load the matching
    tokenizer (`STORY_BASE_MODEL`'s). Blocking: call it off the event loop."""
    url = (settings.generator_url or "").rstrip("/")
    try:
        with urllib.request.urlopen(f"{url}/models", timeout=timeout_s) as response:
            listing = json.load(response)
        first = listing["data"][0]
    except (urllib.error.URLError, OSError, ValueError, KeyError, IndexError, TypeError) as exc:
        reason = getattr(exc, "reason", None) or exc
        raise ConfigError(
            f"STORY_GENERATOR_URL: no completions service answers at {url} ({reason})"
        ) from None
    tokenizer = load_tokenizer(settings)
    window = int(first.get("max_model_len") or getattr(tokenizer, "model_max_length", 1024))
    if window > 1_000_000:  # a tokenizer that does not say
        window = 1024
    info = RemoteModelInfo(str(first["id"]), window, tokenizer, url)
    return RemoteGenerator(info, timeout_s=timeout_s)


class RemoteGenerator:
    """`generation.Generator` over HTTP."""

    def __init__(self, info: RemoteModelInfo, *, timeout_s: float = 10.0) -> None:
        self.info = info
        self.url = info.url
        self.timeout_s = timeout_s
        self.default_adapter: str | None = None
        """The version named by requests without an adapter (None: the service's own
        default, its promoted adapter)."""
        self._session: aiohttp.ClientSession | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._closed = False

    @property
    def alive(self) -> bool:
        return not self._closed

    @property
    def running(self) -> int:
        """Requests streaming now (for metrics; the service queues them itself)."""
        return len(self._tasks)

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        handle = GenerationHandle(request, asyncio.get_running_loop())
        if self._closed:
            handle.cancel()
            handle._finish(empty_output(handle, "cancelled"))
            return handle
        task = asyncio.get_running_loop().create_task(self._run(handle))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return handle

    def submit_many(self, request: GenerationRequest, n: int) -> list[GenerationHandle]:
        """One streamed request per candidate (each with its own seed)."""
        return [self.submit(r) for r in candidate_requests(request, n)]

    async def use_adapter(self, name: str | None, path: str | None = None) -> None:
        self.default_adapter = name

    async def close(self) -> None:
        self._closed = True
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._session is not None:
            await self._session.close()

    # -- one request ----------------------------------------------------------------

    def body(self, request: GenerationRequest) -> dict[str, Any]:
        params = request.params
        body: dict[str, Any] = {
            "prompt": list(request.prompt_ids),
            "max_tokens": params.max_new_tokens,
            "temperature": params.temperature,
            "top_p": params.top_p,
            "top_k": params.top_k,
            "repetition_penalty": params.repetition_penalty,
            "no_repeat_ngram_size": params.no_repeat_ngram_size,
            "min_tokens": request.min_new_tokens,
            "stream": True,
            "return_token_ids": True,  # an extension; a server that does not know it ignores it
            "user": request.channel or None,
        }
        if params.seed is not None:
            body["seed"] = params.seed
        if params.num_beams > 1:
            body |= {"num_beams": params.num_beams, "length_penalty": params.length_penalty}
        adapter = request.adapter or self.default_adapter
        if adapter == BASE_ADAPTER:
            body["model"] = "base"
        elif adapter is not None:
            body["model"] = adapter
        return body

    async def _run(self, handle: GenerationHandle) -> None:
        started = time.perf_counter()
        text, finish, ttft, token_ids = "", "length", None, None
        try:
            session = await self._open()
            body = self.body(handle.request)
            # Ray Serve routes adapters by this header (to a replica that holds the one
            # named); other servers ignore it.
            routing = {"serve_multiplexed_model_id": body["model"]} if "model" in body else {}
            async with session.post(f"{self.url}/completions", json=body, headers=routing) as r:
                if r.status != 200:
                    raise GenerationFailed(await _error_message(r))
                async for line in r.content:
                    if handle.cancelled:
                        finish = "cancelled"
                        break  # leaving the block closes the connection: the service stops
                    event = line.decode("utf-8", "replace").strip()
                    if not event.startswith("data:"):
                        continue
                    data = event.removeprefix("data:").strip()
                    if data == "[DONE]":
                        break
                    choice = json.loads(data)["choices"][0]
                    if choice.get("text"):
                        ttft = ttft if ttft is not None else time.perf_counter() - started
                        text += choice["text"]
                        handle._publish_text(text)
                    if choice.get("finish_reason"):
                        finish = FINISH.get(choice["finish_reason"], "length")
                    if isinstance(choice.get("token_ids"), list):
                        token_ids = choice["token_ids"]
        except asyncio.CancelledError:  # the generator is closing
            finish = "cancelled"
        except GenerationFailed as exc:
            handle._finish(exc)
            return
        except Exception as exc:  # the service went away, or answered nonsense
            log.warning("generation service failed: %s", exc)
            handle._finish(GenerationFailed("The storyteller's generation service did not answer."))
            return
        handle._finish(
            GenerationOutput(
                # the service's own ids when it says them, else the text's
                token_ids if token_ids is not None else self.info.encode(text) if text else [],
                text,
                finish,  # type: ignore[arg-type]
                len(handle.request.prompt_ids),
                time.perf_counter() - started,
                ttft,
                adapter=handle.request.adapter or self.default_adapter or BASE_ADAPTER,
            )
        )

    async def _open(self) -> aiohttp.ClientSession:
        import aiohttp

        if self._session is None:
            # No overall limit (a long story takes its time); a silent service is a failure.
            timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.timeout_s)
            self._session = aiohttp.ClientSession(timeout=timeout)
        return self._session


async def _error_message(response: Any) -> str:
    try:
        message = (await response.json())["error"]["message"]
    except Exception:
        message = f"HTTP {response.status}"
    return f"The generation service refused the request: {message}"
