"""Continuous batching: many channels' requests decoded together, one step at a time.

Decoding one sequence is bound by reading the weights, so a batch of sequences costs
little more per step than one. `BatchingGenerator` keeps a batch of running sequences
with one shared, left-padded KV cache and, on a worker thread, repeats:

    1. admit    waiting requests join between steps (fair across channels, within the
                batch-size and tokens-in-flight bounds, a bounded number of prompt
                tokens per step so prefill never stalls the running ones for long)
    2. prefill  each newcomer's prompt in a forward pass of its own (no padding);
                their caches are merged into the batch
    3. decode   one forward pass for every running sequence, each with its own
                sampling parameters, seed, stop rules and LoRA adapter
    4. retire   finished or cancelled sequences leave; the cache shrinks with them

As in nano-vllm and vLLM v1, three parts do this: who runs is the policy's (`policy`:
per-channel queues, who fits), running them is the model runner's (`runner`: prefill,
the shared cache, decoding steps, adapters' rows), and each row's next token is the
sampler's (`sampler`). This module holds the requests' side: the worker thread and its
loop, the sequences' state, handles, cancellation, failures and adapter switches.

A failure stays with the request it belongs to. A request that cannot be served fails
at admission; one whose prefill raises fails alone; a row whose scores are not numbers
(NaN logits: a damaged adapter) fails alone and leaves the batch, and a row whose
tempered distribution overflows (a temperature far too small) takes its limit, the
greedy token. Only an error in a step that belongs to no one row (a bug, out of memory)
fails the whole batch, with a `GenerationFailed` for each request; the scheduler starts
afresh for the next ones.

Best-of-n (`submit_many`): the n candidates of one request are a group that waits,
is admitted and is prefilled as one: its prompt goes through the model once
(`prefilled_tokens` counts it once) and its keys and values are copied into n rows of
the batch, which then decode as any rows do, each with its own seed and handle. A group
counts as one request in the round-robin over channels (other channels still get their
turn after it) and as n rows and n times its tokens against the batch bounds. It is
admitted whole or waits at the head of its channel's turn, so single requests cannot
slip past it forever; n is clamped at submission to what an empty batch holds.
Cancelling one candidate ends that row alone.

Adapters on demand: a request that names an adapter which is not loaded, with its path
(`GenerationRequest.adapter_path`), has it loaded when it is admitted, between two
steps on this thread; those loaded so are kept in an `AdapterCache` of at most
`max_loaded_adapters` unused ones (least recently used unloaded first; one that a
running, waiting or beam-searching request names is never unloaded).

Why not transformers' own continuous batching (`generate_batch`,
`ContinuousBatchingManager`)? It drops the repetition penalty, the no-repeat n-gram
rule and min-new-tokens, has no per-request seed, and does not pass peft's per-row
`adapter_names`; a story needs all of them. Beam search requests are served by a
`SequentialGenerator` beside the batch.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ..errors import GenerationFailed
from .generation import (
    STEP_FAILED,
    UNUSABLE_SCORES,
    AdapterCache,
    GenerationHandle,
    GenerationOutput,
    GenerationRequest,
    SequentialGenerator,
    _control_job,
    adapter_names_for,
    candidate_requests,
    check_prompt,
    empty_output,
    generation_failed,
)
from .policy import FairQueue, Room, Shape
from .runner import ModelRunner, Prefilled
from .sampler import sample_next_tokens

if TYPE_CHECKING:
    import torch

    from .modeling import LoadedModel

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SchedulerConfig:
    max_batch_size: int = 32
    """Most sequences decoded together."""
    max_tokens_in_flight: int = 32768
    """Bound on the sum of (prompt + max new tokens) over running sequences: the KV
    cache never holds more than this many positions."""
    prefill_tokens_per_step: int = 1024
    """Most prompt tokens prefilled between two decoding steps (at least one request
    is always admitted when there is room)."""
    stream_every: int = 4
    """Publish streamed text on the first token, then every this many tokens."""
    max_loaded_adapters: int = 8
    """Most adapters loaded on demand kept loaded while no request uses them (LRU)."""


_Group = list[GenerationHandle]
"""The handles of one request: one, or a best-of-n request's candidates."""


@dataclass
class _Sequence:
    """One admitted request, a row of the batch: what the sampler reads of it (a
    `SamplingRow`) and what its handle is answered with."""

    handle: GenerationHandle
    prompt_len: int
    max_new: int
    adapter: str
    generator: torch.Generator | None
    tokens: list[int]
    """Prompt and generated tokens (what the repetition rules look at)."""
    new: list[int] = field(default_factory=list)
    seen: torch.Tensor | None = None
    """Distinct tokens so far, for the repetition penalty."""
    seen_set: set[int] = field(default_factory=set)
    ngrams: dict[tuple[int, ...], set[int]] = field(default_factory=dict)
    first_token_at: float | None = None
    finish: str | None = None
    """"eos", "length", "cancelled", or "failed" (then `error` is what its handle gets)."""
    error: BaseException | None = None

    @property
    def request(self) -> GenerationRequest:
        return self.handle.request

    @property
    def cost(self) -> int:
        return self.prompt_len + self.max_new


class BatchingGenerator:
    """A `Generator` that serves concurrent requests by continuous batching."""

    def __init__(self, model: LoadedModel, config: SchedulerConfig | None = None) -> None:
        self.model = model
        self.config = config or SchedulerConfig()
        # Beam search is not batched: it runs beside the batch, on adapters loaded here.
        self._beams = SequentialGenerator(model, max_loaded_adapters=None)
        self._inbox: deque[_Group] = deque()
        self._waiting: FairQueue[_Group] = FairQueue()
        """Per channel, its requests in order (`policy`); a group is one request's
        candidates."""
        self._wake = threading.Condition()
        self._closed = False
        self._running: list[_Sequence] = []
        """The batch's rows, in the runner's order."""
        self._joining: list[_Sequence] = []
        """Admitted this step, not yet in the batch."""
        self.steps = 0
        self.prefilled_tokens = 0
        """Prompt tokens run through prefill: a best-of-n group's prompt counts once."""
        self._control: deque[Callable[[], None]] = deque()
        self._loaded: set[str] = set()
        """Adapters `use_adapter` loaded from disk (registry versions)."""
        self._retiring: set[str] = set()
        """Loaded adapters no longer the default: unloaded once no sequence uses them."""
        self.adapters = AdapterCache(model, self.config.max_loaded_adapters)
        """Adapters loaded on demand for requests that give their path."""
        self._runner = ModelRunner(model)
        """The model, its network and the batch's KV cache (used on the worker thread)."""
        self._thread = threading.Thread(target=self._work, name="story-scheduler", daemon=True)
        self._thread.start()

    # -- the caller's side (event loop) -------------------------------------------

    @property
    def info(self) -> LoadedModel:
        return self.model

    def submit(self, request: GenerationRequest) -> GenerationHandle:
        if request.params.beam_search:
            return self._submit_beams(request)
        handle = GenerationHandle(request, asyncio.get_running_loop())
        self._enqueue([handle])
        return handle

    def submit_many(self, request: GenerationRequest, n: int) -> list[GenerationHandle]:
        """`n` candidates of `request` that share one prefill (see `candidate_requests`
        for their seeds; a request that does not sample gets one handle). n is clamped to
        what an empty batch holds: `max_batch_size` rows and `max_tokens_in_flight`."""
        requests = candidate_requests(request, n)
        if len(requests) == 1:
            return [self.submit(requests[0])]
        requests = requests[: self._group_limit(request)]
        loop = asyncio.get_running_loop()
        handles = [GenerationHandle(r, loop) for r in requests]
        self._enqueue(list(handles))  # the worker's own list: it drops cancelled ones
        return handles

    def _group_limit(self, request: GenerationRequest) -> int:
        """How many rows of `request` an empty batch holds (at least one)."""
        cfg = self.config
        prompt_len, max_new = self._shape(request)
        return max(1, min(cfg.max_batch_size, cfg.max_tokens_in_flight // (prompt_len + max_new)))

    def _shape(self, request: GenerationRequest) -> tuple[int, int]:
        """The prompt length and most new tokens a request runs with (the prompt cut to
        the context window, the reply to what is left of it)."""
        window = self.model.context_window
        prompt_len = min(len(request.prompt_ids), window - 1)
        return prompt_len, max(1, min(request.params.max_new_tokens, window - prompt_len))

    def _enqueue(self, group: _Group) -> None:
        with self._wake:
            if self._closed:  # nothing will run it
                for handle in group:
                    handle.cancel()
                    handle._finish(empty_output(handle, "cancelled"))
                return
            self._inbox.append(group)
            position = len(self._waiting) + len(self._inbox) - 1
            for handle in group:
                handle.queue_position = position
            self._wake.notify()

    def _submit_beams(self, request: GenerationRequest) -> GenerationHandle:
        """Beam search runs beside the batch; an adapter it needs loaded is loaded here,
        between two steps, before the request is handed over."""
        if request.adapter_path is None:
            return self._beams.submit(request)
        handle = GenerationHandle(request, asyncio.get_running_loop())

        def hand_over() -> None:
            try:
                if self.adapters.prepare(request):
                    self._runner.attach()
            except GenerationFailed as exc:
                handle._finish(exc)
                return
            self._beams.enqueue(handle)  # now in use there: not unloaded

        with self._wake:
            if not self._closed:
                self._control.append(hand_over)
                self._wake.notify()
                return handle
        self._beams.enqueue(handle)  # closed: resolved as cancelled
        return handle

    async def use_adapter(self, name: str | None, path: str | None = None) -> None:
        """Switch the default adapter between two decoding steps: running sequences keep
        the adapter they started with (it stays loaded), new ones get this one."""
        done: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        job = _control_job(self.model, name, path, done)

        def switch() -> None:
            before = self.model.default_adapter
            job()
            now = self.model.default_adapter
            if now == name and name is not None and path is not None:
                self._loaded.add(name)
            self._retiring.discard(now or "")
            if before in self._loaded and before != now:
                self._retiring.add(before)
            self._runner.attach()

        with self._wake:
            self._control.append(switch)
            self._wake.notify()
        await done

    async def close(self) -> None:
        """Stop: running requests end after the current step and waiting ones without
        starting, each resolved as cancelled (with what it wrote so far)."""
        with self._wake:
            self._closed = True
            self._wake.notify()
        await asyncio.to_thread(self._thread.join)
        await self._beams.close()

    @property
    def running(self) -> int:
        return len(self._running)

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet admitted to the batch (for metrics)."""
        with self._wake:
            return len(self._inbox) + len(self._waiting)

    @property
    def alive(self) -> bool:
        """True while the worker thread runs and the generator is not closed."""
        return self._thread.is_alive() and not self._closed

    # -- the worker thread --------------------------------------------------------

    def _work(self) -> None:
        import torch

        with torch.inference_mode():
            while True:
                with self._wake:
                    while (
                        not self._closed
                        and not self._control
                        and not self._inbox
                        and not self._running
                        and not self._waiting
                    ):
                        self._wake.wait()
                    if self._closed:
                        break
                    while self._inbox:
                        group = self._inbox.popleft()
                        self._waiting.push(group[0].request.channel, group)
                try:
                    self._step()
                except Exception as exc:  # no one row's fault: fail the batch, start afresh
                    log.exception("scheduler step failed")
                    for seq in [*self._running, *self._joining]:
                        seq.handle._finish(generation_failed(STEP_FAILED, exc))
                    self._running, self._joining = [], []
                    self._runner.clear()
        for seq in self._running:
            seq.handle.cancel()
            self._resolve(seq, "cancelled")
        with self._wake:  # submit() adds no more once closed
            groups = [*self._waiting.clear(), *self._inbox]
            self._inbox.clear()
            control = list(self._control)  # e.g. beam searches to hand over: they end too
            self._control.clear()
        for job in control:
            try:
                job()
            except Exception:
                log.exception("a control job failed while closing")
        for handle in (h for g in groups for h in g):
            handle.cancel()
            handle._finish(empty_output(handle, "cancelled"))

    def _step(self) -> None:
        while self._control:
            self._control.popleft()()
        self._drop_cancelled_waiting()
        admitted = self._admit()
        self._update_queue_positions()
        if admitted:
            self._joining = [seq for group in admitted for seq in group]
            self._prefill(admitted)
            self._joining = []
            self._retire()  # newcomers may finish on their first token
        if self._running:
            self._decode()
            self._retire()
        if self._retiring:
            self._unload_retired()
        over = len(self.adapters.loaded) > self.adapters.bound
        if over and self.adapters.evict(self._adapters_in_use()):
            self._runner.attach()
        self.steps += 1

    def _adapters_in_use(self) -> set[str | None]:
        """The adapters that running, waiting and beam-searching requests name (None: the
        default)."""
        in_use: set[str | None] = {s.adapter for s in self._running}
        with self._wake:
            groups = [*self._waiting, *self._inbox]
        in_use |= {h.request.adapter for g in groups for h in g}
        return in_use | self._beams.adapters_in_use()

    def _unload_retired(self) -> None:
        """Unload the adapters that stopped being the default once nothing running or
        waiting uses them, so a long-lived server does not keep every version."""
        gone = self._retiring - self._adapters_in_use()
        if not gone:
            return
        self._runner.unload(gone)
        for name in gone:
            self.adapters.forget(name)
        self._retiring -= gone
        self._loaded -= gone
        log.info("unloaded adapters no longer served: %s", ", ".join(sorted(gone)))

    def _drop_cancelled_waiting(self) -> None:
        """Cancelled requests leave the queues (a group keeps its other candidates)."""

        def gone(group: _Group) -> bool:
            for handle in [h for h in group if h.cancelled]:
                group.remove(handle)
                handle._finish(empty_output(handle, "cancelled"))
            return not group

        self._waiting.remove(gone)

    def _admit(self) -> list[list[_Sequence]]:
        """Let waiting requests in while the batch has room (`FairQueue.admit`: channels
        in turn, a group of candidates whole), each prepared here: its adapter loaded,
        its sequences made. One that cannot be prepared fails alone."""
        cfg = self.config
        room = Room(
            cfg.max_batch_size,
            cfg.max_tokens_in_flight,
            cfg.prefill_tokens_per_step,
            rows=len(self._running),
            tokens=sum(s.cost for s in self._running),
        )
        prepared: list[list[_Sequence]] = []

        def accept(group: _Group) -> bool:
            try:
                if self.adapters.prepare(group[0].request):
                    self._runner.attach()
                prepared.append([self._new_sequence(handle) for handle in group])
                return True
            except Exception as exc:  # e.g. an adapter that is not loaded: this one fails
                if not isinstance(exc, ValueError | GenerationFailed):
                    log.exception("admission failed")
                    exc = generation_failed(STEP_FAILED, exc)
                for handle in group:
                    handle._finish(exc)
                return False

        self._waiting.admit(room, self._group_shape, accept)
        return prepared

    def _group_shape(self, group: _Group) -> Shape:
        prompt_len, max_new = self._shape(group[0].request)
        return Shape(len(group), prompt_len, max_new)

    def _update_queue_positions(self) -> None:
        """Each waiting request's place in the round-robin (a group's candidates share
        theirs: a best-of-n request is one request ahead of the others)."""
        for group, position in self._waiting.positions():
            for handle in group:
                handle.queue_position = position

    def _new_sequence(self, handle: GenerationHandle) -> _Sequence:
        import torch

        request = handle.request
        window = self.model.context_window
        prompt = request.prompt_ids[-(window - 1) :]
        check_prompt(prompt, self._runner.vocabulary)
        max_new = max(1, min(request.params.max_new_tokens, window - len(prompt)))
        generator = None
        if request.params.seed is not None and not request.params.greedy:
            generator = torch.Generator(device=self.model.device).manual_seed(request.params.seed)
        seq = _Sequence(
            handle=handle,
            prompt_len=len(prompt),
            max_new=max_new,
            adapter=adapter_names_for(self.model, request.adapter),
            generator=generator,
            tokens=list(prompt),
            seen=torch.tensor(sorted(set(prompt)), device=self.model.device),
            seen_set=set(prompt),
        )
        n = request.params.no_repeat_ngram_size
        if n > 0:
            for i in range(len(prompt) - n + 1):
                seq.ngrams.setdefault(tuple(prompt[i : i + n - 1]), set()).add(prompt[i + n - 1])
        return seq

    def _prefill(self, admitted: list[list[_Sequence]]) -> None:
        """Prefill each newcomer on its own (no padding wasted on short prompts), a group
        of candidates once for all, then merge them into the batch. A newcomer whose
        prefill fails fails alone (a group: its candidates)."""
        import torch

        joined: list[list[_Sequence]] = []
        prefilled: list[Prefilled] = []
        for group in admitted:
            first = group[0]
            try:
                prefilled.append(self._runner.prefill(first.tokens, first.adapter, len(group)))
            except Exception as exc:
                log.exception(
                    "prefill failed (adapter %r); that request alone fails", first.adapter
                )
                for seq in group:
                    seq.handle._finish(generation_failed(STEP_FAILED, exc))
                continue
            self.prefilled_tokens += first.prompt_len
            joined.append(group)
        if joined:
            order = self._runner.join(prefilled)
            self._running = [
                self._running[row] if newcomer is None else joined[newcomer][row]
                for newcomer, row in order
            ]
            logits = torch.cat([p.logits for p in prefilled])
            self._sample_and_advance([s for g in joined for s in g], logits)

    def _decode(self) -> None:
        running = self._running
        logits = self._runner.decode(
            [s.tokens[-1] for s in running],
            [len(s.tokens) - 1 for s in running],
            [s.adapter for s in running],
        )
        self._sample_and_advance(running, logits)

    def _sample_and_advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        import torch

        tokens = sample_next_tokens(seqs, logits, self.model.eos_token_id)
        now = time.perf_counter()
        eos = self.model.eos_token_id
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.handle.cancelled:
                seq.finish = "cancelled"
                continue
            if token is None or not 0 <= token < self._runner.vocabulary:
                # Its scores were not numbers: this row leaves the batch, the others go on.
                log.warning(
                    "unusable scores with adapter %r: that request alone fails",
                    seq.adapter,
                )
                seq.finish, seq.error = "failed", generation_failed(UNUSABLE_SCORES)
                continue
            if seq.first_token_at is None:
                seq.first_token_at = now
            if token == eos:
                seq.finish = "eos"
                continue
            if token not in seq.seen_set:
                assert seq.seen is not None
                seq.seen_set.add(token)
                seq.seen = torch.cat([seq.seen, seq.seen.new_tensor([token])])
            seq.tokens.append(token)
            seq.new.append(token)
            n = seq.request.params.no_repeat_ngram_size
            if n > 0 and len(seq.tokens) >= n:
                seq.ngrams.setdefault(tuple(seq.tokens[-n:-1]), set()).add(seq.tokens[-1])
            if len(seq.new) >= seq.max_new:
                seq.finish = "length"
            if (len(seq.new) - 1) % self.config.stream_every == 0 or seq.finish:
                seq.handle._publish_text(self.model.decode(seq.new))

    def _retire(self) -> None:
        """Finished and cancelled sequences leave: their handles are answered, their rows
        leave the runner's batch."""
        keep = [i for i, s in enumerate(self._running) if s.finish is None]
        if len(keep) == len(self._running):
            return
        for seq in self._running:
            if seq.finish is not None:
                self._resolve(seq, seq.finish)
        self._runner.retire(keep)
        self._running = [self._running[i] for i in keep]

    def _resolve(self, seq: _Sequence, finish: str) -> None:
        handle = seq.handle
        if seq.error is not None:
            handle._finish(seq.error)
            return
        end = time.perf_counter()
        first = seq.first_token_at or end
        handle._finish(
            GenerationOutput(
                token_ids=list(seq.new),
                text=self.model.decode(seq.new),
                finish_reason=finish,  # type: ignore[arg-type]
                prompt_tokens=seq.prompt_len,
                latency_s=end - handle.submitted_at,
                ttft_s=first - handle.submitted_at,
                adapter=seq.adapter,
            )
        )
