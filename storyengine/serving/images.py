"""Pictures for stories: one interface, two backends.

    LocalPictures   a diffusers text-to-image pipeline in this process (`STORY_IMAGE_MODEL`:
                    a Hugging Face id or a local folder of any pipeline), loaded on first
                    use and run on one worker thread, never on the event loop
    RemotePictures  an OpenAI-compatible image service (`STORY_IMAGE_URL`), spoken as
                    `POST /v1/images/generations` (`storyengine serve` answers it too)

Both queue: one picture is drawn at a time locally (a few at a time remotely) and at
most `STORY_IMAGE_QUEUE` wait behind; past that a request is refused at once with a
message saying so, rather than left waiting for minutes. A caller may pass `on_progress`,
called on the event loop with (step, steps) as the picture is drawn.

The prompt arrives here already written and filtered (`storyengine.story.illustrations`);
a backend only draws it.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import inspect
import io
import json
import logging
import warnings
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol

from ..errors import ConfigError, IllustrationFailed, IllustratorBusy

if TYPE_CHECKING:
    from ..config import Settings

log = logging.getLogger(__name__)

MAX_PICTURE_BYTES = 20 * 1024 * 1024
"""Largest picture taken from an image service (Discord's attachment limit is lower)."""

Progress = Callable[[int, int], None]
"""(step, steps): called on the event loop while a picture is drawn."""


@dataclass(frozen=True)
class PictureRequest:
    prompt: str
    width: int = 512
    height: int = 512
    steps: int = 25
    seed: int | None = None


@dataclass(frozen=True)
class Picture:
    data: bytes
    """The encoded image: PNG from the local pipeline, whatever the service sent."""
    media_type: str
    """image/png, image/jpeg or image/webp."""
    prompt: str

    @property
    def extension(self) -> str:
        return self.media_type.removeprefix("image/").replace("jpeg", "jpg")


class PictureBackend(Protocol):
    name: str
    """What draws, as said to a person: "the local pipeline X" or "the service at U"."""

    async def draw(
        self, request: PictureRequest, *, on_progress: Progress | None = None
    ) -> Picture:
        """The picture, or `IllustrationFailed` / `IllustratorBusy` with a message."""
        ...

    async def close(self) -> None: ...


def media_type(data: bytes) -> str | None:
    """The image type of `data` from its first bytes, or None if it is not an image."""
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    return None


class _Queue:
    """At most `running` draw at once and `waiting` wait behind them; more are refused."""

    def __init__(self, running: int, waiting: int) -> None:
        self._slots = asyncio.Semaphore(running)
        self._limit = running + waiting
        self._inside = 0

    async def __aenter__(self) -> None:
        if self._inside >= self._limit:
            raise IllustratorBusy(
                f"The illustrator is busy: {self._inside} pictures are being drawn or waiting."
                " Try again in a minute."
            )
        self._inside += 1
        try:
            await self._slots.acquire()
        except BaseException:
            self._inside -= 1
            raise

    async def __aexit__(self, *exc: object) -> None:
        self._slots.release()
        self._inside -= 1


class _Stop(Exception):
    """Raised inside a pipeline's step callback: whoever asked has gone."""


def _retrieved(work: asyncio.Future[Any]) -> None:
    """A draw nobody waits for any more ends (stopped, or finished): its outcome is
    read here so that asyncio does not warn of an exception never retrieved."""
    if not work.cancelled():
        work.exception()


class LocalPictures:
    def __init__(self, model: str, *, device: str = "auto", dtype: str = "auto", waiting: int = 4):
        self.model = model
        self.name = f"the local pipeline {model}"
        self._device = device
        self._dtype = dtype
        self._pipeline: Any = None
        self._queue = _Queue(1, waiting)
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="taleweaver-pictures")
        self._closed = False

    async def draw(
        self, request: PictureRequest, *, on_progress: Progress | None = None
    ) -> Picture:
        loop = asyncio.get_running_loop()
        stop = False

        def step(done: int, steps: int) -> None:  # on the worker thread
            if stop or self._closed:
                raise _Stop
            if on_progress is not None:
                loop.call_soon_threadsafe(on_progress, done, steps)

        async with self._queue:
            work = loop.run_in_executor(self._thread, self._draw, request, step)
            try:
                return await asyncio.shield(work)
            except asyncio.CancelledError:
                stop = True  # the pipeline stops at its next step, freeing the thread
                work.add_done_callback(_retrieved)
                raise
            except _Stop:  # closed meanwhile
                raise IllustrationFailed(
                    "The storyteller is shutting down: the picture was not finished."
                ) from None

    def _draw(self, request: PictureRequest, step: Callable[[int, int], None]) -> Picture:
        import torch

        pipeline = self._load()
        accepts = inspect.signature(pipeline.__call__).parameters
        wanted: dict[str, Any] = {
            "num_inference_steps": request.steps,
            "height": request.height,
            "width": request.width,
        }
        kwargs = {k: v for k, v in wanted.items() if k in accepts}
        if request.seed is not None and "generator" in accepts:
            kwargs["generator"] = torch.Generator("cpu").manual_seed(request.seed)
        if "callback_on_step_end" in accepts:

            def on_step(pipe: Any, index: int, timestep: Any, tensors: dict[str, Any]) -> Any:
                step(index + 1, request.steps)
                return tensors

            kwargs["callback_on_step_end"] = on_step
        step(0, request.steps)
        try:
            with torch.inference_mode():
                images = pipeline(request.prompt, **kwargs).images
        except (RuntimeError, ValueError, TypeError) as exc:
            log.exception("the image pipeline failed")
            raise IllustrationFailed(f"The image model could not draw this: {exc}") from None
        out = io.BytesIO()
        images[0].save(out, format="PNG")
        return Picture(out.getvalue(), "image/png", request.prompt)

    def _load(self) -> Any:
        if self._pipeline is None:
            from diffusers.pipelines.pipeline_utils import DiffusionPipeline

            from .modeling import resolve_device, resolve_dtype

            device = resolve_device(self._device)
            try:
                with warnings.catch_warnings():  # newer releases call it `dtype`; all take this
                    warnings.simplefilter("ignore", FutureWarning)
                    pipeline = DiffusionPipeline.from_pretrained(
                        self.model, torch_dtype=resolve_dtype(self._dtype, device)
                    )
            except (OSError, ValueError) as exc:
                raise ConfigError(f"STORY_IMAGE_MODEL: cannot load {self.model!r}: {exc}") from None
            pipeline.set_progress_bar_config(disable=True)
            self._pipeline = pipeline.to(device)
            log.info("loaded the image pipeline %s on %s", self.model, device)
        return self._pipeline

    async def close(self) -> None:
        """Drop what waits; a picture being drawn stops at its next step (the process
        can end without waiting for it)."""
        self._closed = True
        self._thread.shutdown(wait=False, cancel_futures=True)


def images_endpoint(url: str) -> str:
    """`STORY_IMAGE_URL` as the generations endpoint: a server's root, its `/v1`, or the
    endpoint itself."""
    url = url.rstrip("/")
    if url.endswith("/images/generations"):
        return url
    if url.endswith("/v1"):
        return url + "/images/generations"
    return url + "/v1/images/generations"


class RemotePictures:
    def __init__(
        self,
        url: str,
        *,
        api_key: str | None = None,
        model: str | None = None,
        timeout_s: float = 300.0,
        running: int = 2,
        waiting: int = 4,
    ) -> None:
        self.endpoint = images_endpoint(url)
        self.name = f"the image service at {url}"
        self._api_key = api_key
        self._model = model
        self._timeout_s = timeout_s
        self._queue = _Queue(running, waiting)
        self._session: Any = None

    async def draw(
        self, request: PictureRequest, *, on_progress: Progress | None = None
    ) -> Picture:
        import aiohttp

        payload: dict[str, Any] = {
            "prompt": request.prompt,
            "n": 1,
            "size": f"{request.width}x{request.height}",
            "response_format": "b64_json",
        }
        if self._model:
            payload["model"] = self._model
        if request.seed is not None:
            payload["seed"] = request.seed  # what local servers accept; others ignore it
        headers = {"Authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        async with self._queue:
            if on_progress is not None:
                on_progress(0, 1)
            if self._session is None:
                self._session = aiohttp.ClientSession(
                    timeout=aiohttp.ClientTimeout(total=self._timeout_s)
                )
            try:
                async with self._session.post(
                    self.endpoint, json=payload, headers=headers
                ) as answer:
                    body = await _read_bounded(answer)
                    if answer.status >= 400:
                        raise IllustrationFailed(
                            f"The image service answered {answer.status}: {_error_text(body)}"
                        )
                data = await self._picture_bytes(body)
            except (aiohttp.ClientError, TimeoutError) as exc:
                raise IllustrationFailed(
                    f"The image service did not answer ({type(exc).__name__}). Try again later."
                ) from None
        kind = media_type(data)
        if kind is None:
            raise IllustrationFailed("The image service sent something that is not an image.")
        if on_progress is not None:
            on_progress(1, 1)
        return Picture(data, kind, request.prompt)

    async def _picture_bytes(self, body: bytes) -> bytes:
        try:
            first = json.loads(body)["data"][0]
        except (ValueError, KeyError, IndexError, TypeError):
            raise IllustrationFailed(
                "The image service's answer was not an images response (expected"
                ' {"data": [{"b64_json": ...}]}).'
            ) from None
        if isinstance(first, dict) and isinstance(first.get("b64_json"), str):
            try:
                return base64.b64decode(first["b64_json"], validate=True)
            except (binascii.Error, ValueError):
                raise IllustrationFailed(
                    "The image service sent a picture that is not base64."
                ) from None
        if isinstance(first, dict) and isinstance(first.get("url"), str):
            if not first["url"].startswith(("http://", "https://")):
                raise IllustrationFailed("The image service sent a link that is not http(s).")
            async with self._session.get(first["url"]) as answer:
                if answer.status >= 400:
                    raise IllustrationFailed(f"The image service's link answered {answer.status}.")
                return await _read_bounded(answer)
        raise IllustrationFailed("The image service's answer held neither b64_json nor url.")

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None


async def _read_bounded(answer: Any) -> bytes:
    """An answer's body, refused past MAX_PICTURE_BYTES (base64 included)."""
    limit = MAX_PICTURE_BYTES * 4 // 3 + 4096
    chunks, size = [], 0
    async for chunk in answer.content.iter_chunked(65536):
        size += len(chunk)
        if size > limit:
            raise IllustrationFailed("The image service sent a picture larger than 20 MiB.")
        chunks.append(chunk)
    return b"".join(chunks)


def _error_text(body: bytes) -> str:
    """The service's error message, short (OpenAI's `{"error": {"message": ...}}` or text)."""
    try:
        error = json.loads(body).get("error")
        text = error.get("message") if isinstance(error, dict) else str(error)
    except (ValueError, AttributeError):
        text = body.decode("utf-8", "replace")
    text = " ".join(str(text).split())
    return (text[:197] + "…") if len(text) > 200 else (text or "no reason given")


MAX_PROMPT_CHARS = 4000


def picture_request(body: Any, *, size: int, steps: int) -> PictureRequest:
    """An OpenAI images request body as a `PictureRequest` (what `storyengine serve`
    answers at /v1/images/generations). Raises `ValueError(message, field)` for what it
    cannot draw: more than one picture, links instead of the picture itself, a size
    that is not WIDTHxHEIGHT in multiples of 8."""
    if not isinstance(body, dict):
        raise ValueError("The body must be a JSON object.", None)
    prompt = body.get("prompt")
    if not isinstance(prompt, str) or not prompt.strip() or len(prompt) > MAX_PROMPT_CHARS:
        raise ValueError(f"`prompt` must be text of 1 to {MAX_PROMPT_CHARS} characters.", "prompt")
    if body.get("n", 1) != 1:
        raise ValueError("`n` must be 1: one picture per request.", "n")
    if body.get("response_format", "b64_json") != "b64_json":
        raise ValueError(
            "`response_format` must be b64_json (no links are kept).", "response_format"
        )
    width = height = size
    if body.get("size") not in (None, "auto"):
        try:
            width, height = (int(side) for side in str(body["size"]).lower().split("x"))
        except ValueError:
            raise ValueError("`size` must be WIDTHxHEIGHT, e.g. 512x512.", "size") from None
        if not all(16 <= side <= 2048 and side % 8 == 0 for side in (width, height)):
            raise ValueError("`size`: each side 16 to 2048 pixels, a multiple of 8.", "size")
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or seed < 0):
        raise ValueError("`seed` must be a whole number of 0 or more.", "seed")
    return PictureRequest(prompt, width, height, steps, seed)


def make_picture_backend(settings: Settings) -> PictureBackend | None:
    """The configured backend, or None when illustrations are off. Nothing loads yet."""
    if settings.image_model:
        import importlib.util

        if importlib.util.find_spec("diffusers") is None:
            raise ConfigError("STORY_IMAGE_MODEL needs diffusers: pip install 'taleweaver[images]'")
        return LocalPictures(
            settings.image_model,
            device=settings.device,
            dtype=settings.dtype,
            waiting=settings.image_queue,
        )
    if settings.image_url:
        return RemotePictures(
            settings.image_url,
            api_key=settings.image_api_key,
            model=settings.image_service_model,
            timeout_s=settings.image_timeout_s,
            waiting=settings.image_queue,
        )
    return None
