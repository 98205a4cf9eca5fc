"""Generation requests and the generators that serve them.

A `Generator` takes `GenerationRequest`s from async code and returns a
`GenerationHandle` per request: await `handle.result()` for the whole output, or
iterate `handle.stream()` for text as it grows; `handle.cancel()` stops it at the next
decoding step. The model itself never runs on the event loop.

`SequentialGenerator` runs one request at a time on a worker thread with Hugging Face's
`generate` (it supports every decoding option, beam search included). Other generators
(a batching scheduler, a remote server) implement the same interface.

Failures stay with the request that met them. A request the generator cannot serve (an
adapter that is not loaded, a token the model does not know) fails with `ValueError`
before it runs; a model that produces unusable scores for it (NaN: a damaged adapter)
or an error while it runs fails it with `GenerationFailed`, whose message is safe to
show (the cause is logged); the worker goes on with the next request. Closing a
generator resolves every request it still holds as cancelled, and a worker that
outlives its event loop (a process stopping) drops what it can no longer deliver.

Best-of-n: `submit_many(request, n)` asks for n candidate continuations of one prompt,
to keep the one a reward model scores best. Candidate i is the request with seed
`seed + i` (candidate 0 is the request itself; unseeded candidates draw from the global
generator, so they differ too), and each has its own handle. A request that does not
sample (greedy, beam search) has one continuation whatever the seed: it gets a single
handle, not n copies of one text. A generator may also return fewer than n handles when
n rows would not fit its bounds (`BatchingGenerator`); callers score what they get.

Adapters on demand: a request may name an adapter that is not loaded and say where it
lies (`adapter_path`); the generator loads it between forward passes and, through an
`AdapterCache`, unloads the least recently used ones it loaded once more than a bound
are loaded and not in use.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal, Protocol

from ..errors import GenerationCancelled, GenerationFailed
from ..sampling import SamplingParams

if TYPE_CHECKING:
    from .modeling import LoadedModel

log = logging.getLogger(__name__)

FinishReason = Literal["eos", "length", "cancelled"]

BASE_ADAPTER = "__base__"
"""Adapter name that means "no adapter": the bare base model (peft's own spelling)."""

UNUSABLE_SCORES = (
    "The storyteller's model produced no usable words for this request (its adapter may be "
    "damaged). Try again, and tell the bot's admin if it keeps happening."
)
"""Why a request whose scores were not numbers failed (NaN logits: a damaged adapter)."""

STEP_FAILED = (
    "The storyteller ran into a problem and stopped. Try again, and tell the bot's admin if "
    "it keeps happening."
)
"""Why a request failed on an error that is not the user's (logged with its traceback)."""

ADAPTER_UNAVAILABLE = (
    "The storyteller could not load its style for this request. Try again, and tell the "
    "bot's admin if it keeps happening."
)
"""Why a request failed when its adapter could not be loaded from its path (logged)."""


def generation_failed(message: str, cause: BaseException | None = None) -> GenerationFailed:
    """A `GenerationFailed` with a message for the user, chained to what caused it."""
    error = GenerationFailed(message)
    error.__cause__ = cause
    return error


def call_soon(
    loop: asyncio.AbstractEventLoop, callback: Callable[..., object], *args: object
) -> bool:
    """`loop.call_soon_threadsafe` from a worker thread, or False if the loop has closed (the
    process is stopping: no one is left to tell), instead of raising in the worker."""
    try:
        loop.call_soon_threadsafe(callback, *args)
    except RuntimeError:
        if not loop.is_closed():
            raise
        return False
    return True


def adapter_names_for(model: LoadedModel, adapter: str | None) -> str:
    """The peft adapter name a request runs with: its own, else the model's active one,
    else the base model."""
    if not model.is_peft:
        if adapter not in (None, BASE_ADAPTER):
            raise ValueError(f"adapter {adapter!r} asked for, but the model has no adapters")
        return BASE_ADAPTER
    if adapter is None:
        return model.default_adapter or BASE_ADAPTER
    if adapter != BASE_ADAPTER and adapter not in model.model.peft_config:
        raise ValueError(f"no adapter named {adapter!r} is loaded")
    return adapter


def vocabulary_size(model: LoadedModel) -> int:
    """How many token ids the model's input embeddings know."""
    return int(model.model.get_input_embeddings().num_embeddings)


def check_prompt(prompt_ids: list[int], vocabulary: int) -> None:
    """Refuse a prompt with token ids outside the model's vocabulary: an embedding lookup
    out of range fails the forward pass (on a GPU it breaks the device for every request)."""
    if prompt_ids and not 0 <= min(prompt_ids) <= max(prompt_ids) < vocabulary:
        raise ValueError(
            f"the prompt holds token ids outside the model's vocabulary ({vocabulary})"
        )


@dataclass
class GenerationRequest:
    prompt_ids: list[int]
    params: SamplingParams
    channel: str = ""
    """Who asked; a batching generator uses it to share capacity fairly."""
    adapter: str | None = None
    """Name of a loaded LoRA adapter, or None for the generator's default."""
    min_new_tokens: int = 0
    adapter_path: str | None = None
    """Where `adapter` lies on disk (peft format), for a generator to load it on demand
    when it is not loaded; None: it must be loaded already."""


def candidate_requests(request: GenerationRequest, n: int) -> list[GenerationRequest]:
    """The requests for `n` candidate continuations of `request` (best-of-n): candidate i
    samples with seed `seed + i`, so candidate 0 is `request` itself. One request when
    `request` does not sample (greedy or beam search: every candidate would be the same)."""
    if n < 1:
        raise ValueError("best-of-n needs at least one candidate")
    params = request.params
    if params.greedy or params.beam_search:
        return [request]
    if params.seed is None:  # unseeded rows draw from the global generator: they differ
        return [dataclasses.replace(request) for _ in range(n)]
    return [
        dataclasses.replace(request, params=params.replace(seed=params.seed + i)) for i in range(n)
    ]


@dataclass
class GenerationOutput:
    token_ids: list[int]
    text: str
    finish_reason: FinishReason
    prompt_tokens: int
    latency_s: float
    ttft_s: float | None
    adapter: str = BASE_ADAPTER
    """The adapter the text was written with."""


@dataclass(eq=False)  # compared and hashed by identity
class GenerationHandle:
    """The caller's side of one request. Thread-safe where the worker touches it."""

    request: GenerationRequest
    loop: asyncio.AbstractEventLoop
    submitted_at: float = field(default_factory=time.perf_counter)
    _cancelled: threading.Event = field(default_factory=threading.Event)
    _future: asyncio.Future[GenerationOutput] | None = None
    _text: str = ""
    _updated: asyncio.Event = field(default_factory=asyncio.Event)
    queue_position: int = 0
    """Requests ahead of this one that have not started (0 once it runs)."""

    def __post_init__(self) -> None:
        self._future = self.loop.create_future()

    @property
    def cancelled(self) -> bool:
        return self._cancelled.is_set()

    def cancel(self) -> None:
        self._cancelled.set()

    async def result(self) -> GenerationOutput:
        """The finished output. Raises `GenerationCancelled` if it was cancelled."""
        assert self._future is not None
        output = await asyncio.shield(self._future)
        if output.finish_reason == "cancelled":
            raise GenerationCancelled(output)
        return output

    async def outcome(self) -> GenerationOutput:
        """The finished output, cancelled or not (a cancelled one holds what was
        written before it stopped)."""
        assert self._future is not None
        return await asyncio.shield(self._future)

    async def stream(self) -> AsyncIterator[str]:
        """Yield the decoded text so far, each time it grows, until the request ends."""
        assert self._future is not None
        seen = ""
        while True:
            if self._text != seen:
                seen = self._text
                yield seen
            if self._future.done():
                break
            self._updated.clear()
            if self._text == seen and not self._future.done():
                waiter = asyncio.ensure_future(self._updated.wait())
                await asyncio.wait({waiter, self._future}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
        output = self._future.result()
        if output.text != seen:
            yield output.text

    # Called from the worker thread. Once the loop has closed no one can receive the
    # request's results: it is cancelled, so that its worker stops spending time on it.
    def _publish_text(self, text: str) -> None:
        if not call_soon(self.loop, self._set_text, text):
            self._cancelled.set()

    def _set_text(self, text: str) -> None:
        self._text = text
        self._updated.set()

    def _finish(self, output: GenerationOutput | BaseException) -> None:
        if not call_soon(self.loop, self._resolve, output):
            self._cancelled.set()

    def _resolve(self, output: GenerationOutput | BaseException) -> None:
        assert self._future is not None
        if self._future.done():
            return
        if isinstance(output, BaseException):
            self._future.set_exception(output)
        else:
            self._text = output.text
            self._future.set_result(output)
        self._updated.set()


def empty_output(handle: GenerationHandle, finish: FinishReason) -> GenerationOutput:
    """The output of a request that ends before its first token."""
    elapsed = time.perf_counter() - handle.submitted_at
    return GenerationOutput([], "", finish, len(handle.request.prompt_ids), elapsed, None)


class ModelInfo(Protocol):
    """What the engine needs to know of the model that writes, with no weights and no
    device: a generator that runs the model elsewhere can describe it too. (A local
    `LoadedModel` is one.)"""

    model_id: str

    @property
    def context_window(self) -> int: ...

    @property
    def special_tokens(self) -> list[str]: ...

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def count_tokens(self, text: str) -> int: ...

    def describe(self) -> str:
        """Where and how it runs, for the start-up log."""
        ...


class Generator(Protocol):
    """What the engine needs from whatever runs the model. Adapters are named by
    version (`v0003`, or `BASE_ADAPTER`); a request's `adapter_path` tells a generator
    that loads them locally where the files are."""

    @property
    def info(self) -> ModelInfo: ...

    def submit(self, request: GenerationRequest) -> GenerationHandle: ...

    def submit_many(self, request: GenerationRequest, n: int) -> list[GenerationHandle]:
        """Up to `n` candidates of `request` (see `candidate_requests`), one handle each:
        one handle for a request that does not sample, fewer than n where the generator's
        bounds hold fewer."""
        ...

    async def use_adapter(self, name: str | None, path: str | None = None) -> None:
        """Make `name` (loaded from `path` if new; None: the base model) the default for
        requests that arrive from now on; those in flight finish as they began."""
        ...

    async def close(self) -> None: ...


class SequentialGenerator:
    """One request at a time, on a worker thread, with `model.generate`.

    It loads a request's adapter on demand (`adapter_path`), keeping at most
    `max_loaded_adapters` of those it loaded when they are not in use; with None it loads
    none itself (a `BatchingGenerator` loads them for the beam search it runs here)."""

    def __init__(self, model: LoadedModel, max_loaded_adapters: int | None = 8) -> None:
        self.model = model
        self._jobs: queue.Queue[GenerationHandle | Callable[[], None] | None] = queue.Queue()
        self._pending: list[GenerationHandle] = []
        self._current: GenerationHandle | None = None
        self._closed = False
        self._lock = threading.Lock()
        self._adapters = (
            AdapterCache(model, max_loaded_adapters) if max_loaded_adapters is not None else None
        )
        self._thread = threading.Thread(target=self._work, name="story-generator", daemon=True)
        self._thread.start()

    @property
    def info(self) -> LoadedModel:
        return self.model

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        handle = GenerationHandle(request, asyncio.get_running_loop())
        self.enqueue(handle)
        return handle

    def submit_many(self, request: GenerationRequest, n: int) -> list[GenerationHandle]:
        """The candidates one after the other: nothing is shared here."""
        return [self.submit(r) for r in candidate_requests(request, n)]

    def enqueue(self, handle: GenerationHandle) -> None:
        """Queue a handle made elsewhere (thread-safe: a batching generator hands over a
        beam search once it has loaded the request's adapter)."""
        with self._lock:
            if self._closed:  # nothing will run it
                handle.cancel()
                handle._finish(empty_output(handle, "cancelled"))
                return
            handle.queue_position = len(self._pending)
            self._pending.append(handle)
        self._jobs.put(handle)

    def adapters_in_use(self) -> set[str | None]:
        """The adapters named by the requests waiting here or running (thread-safe)."""
        with self._lock:
            handles = [*self._pending, self._current]
        return {h.request.adapter for h in handles if h is not None}

    async def use_adapter(self, name: str | None, path: str | None = None) -> None:
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._jobs.put(_control_job(self.model, name, path, done))
        await done

    async def close(self) -> None:
        """Stop: the running request ends at its next token and every waiting one
        without starting, each resolved as cancelled (with what it wrote so far)."""
        with self._lock:
            self._closed = True
            for handle in [*self._pending, self._current]:
                if handle is not None:
                    handle.cancel()
        self._jobs.put(None)
        await asyncio.to_thread(self._thread.join)

    def _work(self) -> None:
        while (handle := self._jobs.get()) is not None:
            if not isinstance(handle, GenerationHandle):
                handle()  # a control job, between two generations
                continue
            with self._lock:
                self._pending.remove(handle)
                for i, waiting in enumerate(self._pending):
                    waiting.queue_position = i
                self._current = handle
            handle.queue_position = 0
            try:
                self._serve(handle)
            finally:
                with self._lock:
                    self._current = None

    def _serve(self, handle: GenerationHandle) -> None:
        """Run one request; whatever goes wrong fails this request alone."""
        if handle.cancelled:  # cancelled while it waited: it never runs
            handle._finish(empty_output(handle, "cancelled"))
            return
        try:
            if self._adapters is not None:
                self._adapters.prepare(handle.request)
                self._adapters.evict([handle.request.adapter, *self.adapters_in_use()])
            adapter_names_for(self.model, handle.request.adapter)
            check_prompt(handle.request.prompt_ids, vocabulary_size(self.model))
        except (ValueError, GenerationFailed) as exc:  # not servable, as the batch says
            handle._finish(exc)
            return
        try:
            with self.model.mutation_lock:
                output = run_generate(self.model, handle)
        except UnusableScores as exc:
            log.warning("generation failed: %s", exc)
            handle._finish(generation_failed(UNUSABLE_SCORES, exc))
        except Exception as exc:
            log.exception("generation failed")
            handle._finish(generation_failed(STEP_FAILED, exc))
        else:
            handle._finish(output)


class AdapterCache:
    """The adapters a generator loads from disk on demand, for requests that name one and
    say where it lies (`GenerationRequest.adapter_path`).

    Those in use stay loaded; of the others, at most `bound` stay, the least recently
    used unloaded first, so that serving many communities' adapters does not keep every
    one in memory. It only ever unloads what it loaded itself: the adapters the model
    came with and the default one are never touched. The bound counts every adapter it
    loaded, so it is exceeded only while more than `bound` of them are in use at once.

    Call it on the thread that runs the model, between forward passes."""

    def __init__(self, model: LoadedModel, bound: int) -> None:
        if bound < 1:
            raise ValueError("max_loaded_adapters must be at least 1")
        self.model = model
        self.bound = bound
        self.loaded: OrderedDict[str, str] = OrderedDict()
        """What it loaded: name -> path, least recently used first."""
        self.loads = 0
        self.load_seconds = 0.0
        """Loads so far, and the time they took (a small LoRA loads in milliseconds)."""

    def prepare(self, request: GenerationRequest) -> bool:
        """Load the request's adapter if it is not loaded and the request says where it
        lies, and mark it used. True when the model changed. An adapter that is neither
        loaded nor given a path is left to `adapter_names_for` to refuse; one that fails to
        load fails the request with `GenerationFailed` (logged)."""
        name, path = request.adapter, request.adapter_path
        if name is None or name == BASE_ADAPTER:
            return False
        if self.model.is_peft and name in self.model.model.peft_config:
            if name in self.loaded:
                self.loaded.move_to_end(name)
            return False
        if path is None:
            return False
        start = time.perf_counter()
        try:
            with self.model.mutation_lock:
                self.model.load_adapter(name, path)
        except Exception as exc:
            log.exception("cannot load adapter %r from %s", name, path)
            raise generation_failed(ADAPTER_UNAVAILABLE, exc) from None
        elapsed = time.perf_counter() - start
        self.loads += 1
        self.load_seconds += elapsed
        self.loaded[name] = path
        log.info("loaded adapter %r on demand in %.1f ms", name, elapsed * 1000)
        return True

    def evict(self, in_use: Iterable[str | None]) -> list[str]:
        """Unload the least recently used adapters beyond the bound that nothing in
        `in_use` names (None: the default). Returns their names (the model changed).
        Nothing waits for it: while a generation beside holds the model, it does nothing
        (the next call tries again)."""
        excess = len(self.loaded) - self.bound
        if excess <= 0:
            return []
        keep = {self.model.default_adapter if name is None else name for name in in_use}
        keep.add(self.model.default_adapter)
        victims = [name for name in self.loaded if name not in keep][:excess]
        if not victims or not self.model.mutation_lock.acquire(blocking=False):
            return []
        try:
            gone = [name for name in victims if self.model.delete_adapter(name)]
        finally:
            self.model.mutation_lock.release()
        for name in gone:
            del self.loaded[name]
        if gone:
            log.info("unloaded adapters not used lately: %s", ", ".join(gone))
        return gone

    def forget(self, name: str) -> None:
        """`name` was unloaded by someone else (a replaced default adapter)."""
        self.loaded.pop(name, None)


def _control_job(
    model: LoadedModel, name: str | None, path: str | None, done: asyncio.Future[None]
) -> Callable[[], None]:
    """A job for a worker thread: switch the default adapter, then resolve `done`."""
    loop = done.get_loop()

    def job() -> None:
        try:
            with model.mutation_lock:
                if name is not None and name != BASE_ADAPTER:
                    if path is not None:
                        model.load_adapter(name, path)
                    elif not model.is_peft or name not in model.model.peft_config:
                        raise ValueError(f"adapter {name!r} is not loaded and no path was given")
                model.default_adapter = None if name == BASE_ADAPTER else name
        except Exception as exc:
            call_soon(loop, done.set_exception, exc)
        else:
            call_soon(loop, done.set_result, None)

    return job


class UnusableScores(Exception):
    """A model produced scores that are not numbers (NaN) for a request."""


def run_generate(model: LoadedModel, handle: GenerationHandle) -> GenerationOutput:
    """Run one request through `model.generate`, streaming text into `handle`."""
    import torch
    from transformers import (
        LogitsProcessor,
        LogitsProcessorList,
        StoppingCriteria,
        StoppingCriteriaList,
    )
    from transformers.generation.streamers import BaseStreamer

    request, params = handle.request, handle.request.params
    first_token_at: list[float] = []
    new_ids: list[int] = []
    prompt_len = len(request.prompt_ids)

    class _Cancel(StoppingCriteria):
        def __call__(
            self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object
        ) -> torch.Tensor:
            return torch.full(
                (input_ids.shape[0],), handle.cancelled, dtype=torch.bool, device=input_ids.device
            )

    class _Refuse(LogitsProcessor):
        """Stop on scores that are not numbers: sampling would fail on them with an
        obscure error, greedy and beam search would write nonsense."""

        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
            if bool((scores.isnan() | (scores == float("inf"))).any()):
                raise UnusableScores(f"NaN or infinite scores with adapter {adapter!r}")
            return scores

    class _Stream(BaseStreamer):
        prompt_seen = False

        def put(self, value: torch.Tensor) -> None:
            if not self.prompt_seen:  # generate() first hands over the prompt
                self.prompt_seen = True
                return
            if not first_token_at:
                first_token_at.append(time.perf_counter())
            new_ids.extend(int(t) for t in value.reshape(-1).tolist())
            handle._publish_text(model.decode(new_ids))

        def end(self) -> None:
            pass

    if params.seed is not None:
        torch.manual_seed(params.seed)
    adapter = adapter_names_for(model, request.adapter)
    kwargs_adapter = {"adapter_names": [adapter]} if model.is_peft else {}
    input_ids = torch.tensor([request.prompt_ids], device=model.device)
    kwargs: dict[str, object] = {
        **params.generate_kwargs(),
        "min_new_tokens": min(request.min_new_tokens, params.max_new_tokens),
        "pad_token_id": model.pad_token_id,
        "eos_token_id": model.eos_token_id,
        "stopping_criteria": StoppingCriteriaList([_Cancel()]),
        "logits_processor": LogitsProcessorList([_Refuse()]),
        **kwargs_adapter,
    }
    if not params.beam_search:  # beams are returned whole, at the end
        kwargs["streamer"] = _Stream()
    with torch.inference_mode():
        out = model.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), **kwargs
        )
    ids = [int(t) for t in out[0, prompt_len:].tolist()]
    finish: FinishReason = "length"
    if model.eos_token_id in ids:
        ids = ids[: ids.index(model.eos_token_id)]
        finish = "eos"
    if handle.cancelled:
        finish = "cancelled"
    end = time.perf_counter()
    ttft = (first_token_at[0] if first_token_at else end) - handle.submitted_at
    return GenerationOutput(
        token_ids=ids,
        text=model.decode(ids),
        finish_reason=finish,
        prompt_tokens=prompt_len,
        latency_s=end - handle.submitted_at,
        ttft_s=ttft,
        adapter=adapter,
    )
