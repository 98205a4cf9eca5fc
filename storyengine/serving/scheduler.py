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
                sampling parameters, seed, stop rules and LoRA adapter (for GPT-2
                models, a lean step straight from the weights: `gpt2_decode`)
    4. retire   finished or cancelled sequences leave; the cache shrinks with them

The batch's rows stay sorted longest first, so that on a CPU each decoding step's
attention reads the cache by groups of rows of like length rather than over the whole
left-padded width (`grouped_attention`).

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
import ctypes
import inspect
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, cast

from ..errors import GenerationFailed
from . import gpt2_decode, grouped_attention
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
    vocabulary_size,
)
from .kvcache import GrowableCache
from .multilora import MultiLoRA
from .policy import FairQueue, Room, Shape

if TYPE_CHECKING:
    import torch

    from .modeling import LoadedModel

log = logging.getLogger(__name__)

TRIM_EVERY_S = 10.0
"""How often, at most, retiring sequences hands freed memory back to the system."""


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
        self._joining: list[_Sequence] = []
        """Admitted this step, not yet in the batch."""
        self._cache: GrowableCache | None = None
        self._mask: torch.Tensor | None = None
        """True where a row's cache holds a token; each row is False, then True."""
        self._groups: list[grouped_attention.RowGroup] | None = None
        """How decoding attention reads the rows (None: all rows over the whole width)."""
        self.steps = 0
        self._trim = _malloc_trim()
        self._trimmed_at = time.monotonic()
        self.prefilled_tokens = 0
        """Prompt tokens run through prefill: a best-of-n group's prompt counts once."""
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either.
        self._control: deque[Callable[[], None]] = deque()
        self._loaded: set[str] = set()
        """Adapters `use_adapter` loaded from disk (registry versions)."""
        self._retiring: set[str] = set()
        """Loaded adapters no longer the default: unloaded once no sequence uses them."""
        self.adapters = AdapterCache(model, self.config.max_loaded_adapters)
        """Adapters loaded on demand for requests that give their path."""
        self._attach_network()
        params = inspect.signature(self._network.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"
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
                    self._attach_network()
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
            self._attach_network()

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
                    self._running, self._cache, self._mask, self._groups = [], None, None, None
                    self._joining = []
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

    def _attach_network(self) -> None:
        """What forward passes call: the base network, with per-row LoRA when the model
        has adapters (re-read after adapters change)."""
        model = self.model
        self._network = model.model.get_base_model() if model.is_peft else model.model
        self._lora = MultiLoRA.attach(model.model) if model.is_peft else None
        # Grouped reads pay off where attention is bound by memory reads and calls are
        # cheap: on the CPU. On a GPU each group would cost kernel launches per layer.
        sdpa = grouped_attention.install(self._network)
        self._grouping = sdpa and model.device.type == "cpu"
        # GPT-2 decodes through a lean step (same arithmetic, none of the module layers).
        self._lean = sdpa and gpt2_decode.supports(self._network, self._lora)
        self._vocabulary = vocabulary_size(model)

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
            self._attach_network()
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
        with self.model.mutation_lock:
            for name in gone:
                self.model.delete_adapter(name)
                self.adapters.forget(name)
        self._retiring -= gone
        self._loaded -= gone
        self._attach_network()
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
                    self._attach_network()
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
        check_prompt(prompt, self._vocabulary)
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

    def _forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        position_ids: torch.Tensor,
        cache: Any,
        adapters: list[str],
        groups: list[grouped_attention.RowGroup] | None = None,
    ) -> torch.Tensor:
        """One forward pass; `cache` is extended in place. Returns the last logits."""
        kwargs: dict[str, Any] = {self._cache_kwarg: cache}
        with (
            self._lora.rows(adapters) if self._lora else nullcontext(),
            grouped_attention.grouped_rows(groups) if groups else nullcontext(),
        ):
            out = self._network(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        return out.logits[:, -1, :].float()

    def _prefill(self, admitted: list[list[_Sequence]]) -> None:
        """Prefill each newcomer on its own (no padding wasted on short prompts), a group
        of candidates once for all, then merge them into the batch. A newcomer whose
        prefill fails fails alone (a group: its candidates)."""
        import torch

        joined, logits, kvs = [], [], []
        for group in admitted:
            try:
                last, kv = self._prefill_one(group[0])
            except Exception as exc:
                log.exception(
                    "prefill failed (adapter %r); that request alone fails", group[0].adapter
                )
                for seq in group:
                    seq.handle._finish(generation_failed(STEP_FAILED, exc))
                continue
            self.prefilled_tokens += group[0].prompt_len
            joined.append(group)
            logits.append(last.expand(len(group), -1))
            kvs.append(kv)
        if joined:
            self._merge(joined, kvs)
            self._sample_and_advance([s for g in joined for s in g], torch.cat(logits))

    def _prefill_one(
        self, seq: _Sequence
    ) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
        """One newcomer's prompt through the model: its last logits ([1, vocab]) and each
        layer's keys and values."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        if self._lean:
            with self._lora.rows([seq.adapter]) if self._lora else nullcontext():
                last, kv = gpt2_decode.prefill(
                    self._network, torch.tensor(seq.tokens, device=device), self._lora
                )
            return last.float(), kv
        ids = torch.tensor([seq.tokens], device=device)
        cache = DynamicCache()
        last = self._forward(
            ids,
            torch.ones_like(ids),
            torch.arange(seq.prompt_len, device=device).unsqueeze(0),
            cache,
            [seq.adapter],
        )
        layers = cast(list[Any], cache.layers)  # our own `GrowingLayer`s
        return last, [(layer.keys, layer.values) for layer in layers]

    def _merge(
        self, admitted: list[list[_Sequence]], kvs: list[list[tuple[torch.Tensor, torch.Tensor]]]
    ) -> None:
        """Add the newcomers (their caches, one per newcomer and layer; a group of
        candidates shares one) to the batch in one copy: every row right-aligned to the
        widest, rows sorted longest first, a group's rows side by side."""
        import torch

        old_lengths = self._mask.sum(1).tolist() if self._mask is not None else []
        # (length, None, old row) or (length, newcomer, 0); stable: old rows first on ties.
        rows = sorted(
            [(length, None, row) for row, length in enumerate(old_lengths)]
            + [(group[0].prompt_len, i, 0) for i, group in enumerate(admitted)],
            key=lambda r: -r[0],
        )
        pieces: list[tuple[int | None, int, int]] = []  # consecutive old rows: one slice
        for _, newcomer, row in rows:
            if newcomer is None and pieces and pieces[-1][0] is None and pieces[-1][2] == row:
                pieces[-1] = (None, pieces[-1][1], row + 1)
            else:
                pieces.append((newcomer, row, row + 1))
        old = self._cache.tensors() if self._cache is not None else []

        def part(newcomer: int | None, a: int, b: int, layer: int) -> tuple[Any, Any]:
            if newcomer is None:
                return old[layer][0][a:b], old[layer][1][a:b]
            k, v = kvs[newcomer][layer]  # one row: a view of it for each candidate
            n = len(admitted[newcomer])
            return k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)

        parts = [[part(*piece, layer) for piece in pieces] for layer in range(len(kvs[0]))]
        old_width = self._mask.shape[1] if self._mask is not None else 0
        width = max(old_width, rows[0][0])
        if self._cache is None:
            self._cache = GrowableCache()
        self._cache.assemble(parts, width)
        running, lengths = [], []
        for length, newcomer, row in rows:
            seqs = [self._running[row]] if newcomer is None else admitted[newcomer]
            running += seqs
            lengths += [length] * len(seqs)
        self._running = running
        columns = torch.arange(width, device=self.model.device)
        self._mask = columns >= width - torch.tensor(lengths, device=columns.device)[:, None]
        self._plan_groups()

    def _plan_groups(self) -> None:
        """Group the rows for decoding attention (after the batch changed: between
        changes every row grows by one token a step, so the groups' columns hold)."""
        if not self._grouping or self._mask is None:
            self._groups = None
            return
        lengths = [int(n) for n in self._mask.sum(1).tolist()]
        self._groups = grouped_attention.plan_groups(lengths, self._mask.shape[1])

    def _decode(self) -> None:
        import torch

        assert self._mask is not None and self._cache is not None
        device = self.model.device
        rows = len(self._running)
        ids = torch.tensor([s.tokens[-1] for s in self._running], device=device)
        positions = torch.tensor([len(s.tokens) - 1 for s in self._running], device=device)
        mask = torch.cat([self._mask, self._mask.new_ones((rows, 1))], dim=1)
        adapters = [s.adapter for s in self._running]
        if self._lean:
            groups = self._groups or [grouped_attention.RowGroup(0, rows, 0, masked=True)]
            with self._lora.rows(adapters) if self._lora else nullcontext():
                logits = gpt2_decode.decode_step(
                    self._network,
                    ids,
                    positions,
                    mask[:, None, None, :],
                    self._cache,
                    groups,
                    self._lora,
                ).float()
        else:
            # Grouped attention slices a 4-D mask (transformers passes one through as is).
            model_mask = mask[:, None, None, :] if self._groups else mask
            logits = self._forward(
                ids.unsqueeze(1),
                model_mask,
                positions.unsqueeze(1),
                self._cache,
                adapters,
                self._groups,
            )
        self._mask = mask
        self._sample_and_advance(self._running, logits)

    def _sample_and_advance(self, seqs: list[_Sequence], logits: torch.Tensor) -> None:
        import torch

        tokens = sample_next_tokens(seqs, logits, self.model.eos_token_id)
        now = time.perf_counter()
        eos = self.model.eos_token_id
        for seq, token in zip(seqs, tokens, strict=True):
            if seq.handle.cancelled:
                seq.finish = "cancelled"
                continue
            if token is None or not 0 <= token < self._vocabulary:
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
        import torch

        keep = [i for i, s in enumerate(self._running) if s.finish is None]
        if len(keep) == len(self._running):
            return
        for seq in self._running:
            if seq.finish is not None:
                self._resolve(seq, seq.finish)
        if not keep:
            self._running, self._cache, self._mask, self._groups = [], None, None, None
            self._give_back_memory(idle=True)
            return
        assert self._cache is not None and self._mask is not None
        index = torch.tensor(keep, device=self._mask.device)
        mask = self._mask.index_select(0, index)
        # Drop leading columns that are padding for every remaining row.
        start = int((mask.sum(0) > 0).nonzero()[0])
        self._mask = mask[:, start:]
        runs = _runs(keep)  # the kept rows, as slices: views, copied once by assemble
        self._cache.assemble(
            [
                [(k[a:b, :, start:], v[a:b, :, start:]) for a, b in runs]
                for k, v in self._cache.tensors()
            ],
            self._mask.shape[1],
        )
        self._running = [self._running[i] for i in keep]
        self._plan_groups()
        self._give_back_memory()

    def _give_back_memory(self, *, idle: bool = False) -> None:
        """Hand the memory that retired caches freed back to the system: when the batch
        empties, else at most every `TRIM_EVERY_S`.

        Each batch change assembles the cache into new buffers and frees the old ones.
        glibc keeps freed memory in its arenas for the next allocations and never hands
        those buffers back (its mmap threshold rises to their size), so a process that
        once ran a full batch kept that memory, idle or not. Pages handed back are faulted
        in again at the next batch change, hence the interval."""
        now = time.monotonic()
        if self._trim is not None and (idle or now - self._trimmed_at >= TRIM_EVERY_S):
            self._trim(0)
            self._trimmed_at = now

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


def _malloc_trim() -> Any:
    """glibc's `malloc_trim`, or None where there is none (macOS, musl, Windows)."""
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    return trim


def _runs(rows: list[int]) -> list[tuple[int, int]]:
    """Sorted row numbers as [start, end) runs of consecutive rows."""
    runs: list[tuple[int, int]] = []
    for row in rows:
        if runs and runs[-1][1] == row:
            runs[-1] = (runs[-1][0], row + 1)
        else:
            runs.append((row, row + 1))
    return runs


def sample_next_tokens(seqs: list[_Sequence], logits: torch.Tensor, eos: int) -> list[int | None]:
    """Pick each row's next token with that row's own rules, in the order Hugging Face's
    `generate` applies them: repetition penalty, no-repeat n-gram, min new tokens, then
    (when sampling) temperature, top-k, top-p.

    None for a row whose scores are not usable: NaN or +inf (a damaged adapter, whatever
    the row's own rules did to them) or no finite score left. Other rows are not
    affected: each row is picked from its own scores."""
    import torch

    device = logits.device
    scores = logits.clone()
    # Repetition penalty over every token seen so far (prompt included), as in HF.
    penalised = [
        (row, s) for row, s in enumerate(seqs) if s.request.params.repetition_penalty != 1.0
    ]
    if penalised:  # one gather and one scatter for the whole batch
        seen = [s.seen for _, s in penalised]
        counts = torch.tensor([len(t) for t in seen], device=device)  # type: ignore[arg-type]
        cols = torch.cat(seen)  # type: ignore[arg-type]
        rows_ = torch.tensor([row for row, _ in penalised], device=device).repeat_interleave(counts)
        penalty = torch.tensor(
            [s.request.params.repetition_penalty for _, s in penalised], device=device
        ).repeat_interleave(counts)
        picked = scores[rows_, cols]
        scores[rows_, cols] = torch.where(picked < 0, picked * penalty, picked / penalty)
    # Banned tokens (no-repeat n-grams, end of text before min_new_tokens): one scatter.
    ban_rows: list[int] = []
    ban_cols: list[int] = []
    for row, seq in enumerate(seqs):
        n = seq.request.params.no_repeat_ngram_size
        if n > 0 and len(seq.tokens) >= n - 1:
            banned = seq.ngrams.get(tuple(seq.tokens[len(seq.tokens) - n + 1 :]))
            if banned:
                ban_rows.extend([row] * len(banned))
                ban_cols.extend(banned)
        if len(seq.new) < seq.request.min_new_tokens:
            ban_rows.append(row)
            ban_cols.append(eos)
    if ban_rows:
        scores[ban_rows, ban_cols] = float("-inf")

    # A row's best score is NaN if any is, +inf if any is and none is NaN, and -inf if
    # all are: one reduction finds the broken rows. (Comparisons and argmax over the
    # whole vocabulary cost ten times more than a reduction on a CPU: only greedy rows
    # take an argmax.)
    top = scores.amax(dim=-1)
    broken = (top.isnan() | top.isinf()).tolist()
    chosen = [-1] * len(seqs)
    greedy = [r for r, s in enumerate(seqs) if s.request.params.temperature == 0.0]
    sampled = [r for r, s in enumerate(seqs) if s.request.params.temperature != 0.0]
    greedy = [r for r in greedy if not broken[r]]
    sampled = [r for r in sampled if not broken[r]]
    if greedy:
        index = torch.tensor(greedy, device=device)
        picks = scores.index_select(0, index).argmax(dim=-1).tolist()
        for row, token in zip(greedy, picks, strict=True):
            chosen[row] = token
    if sampled:
        _sample_rows(seqs, scores, sampled, chosen)
    return [None if token < 0 else token for token in chosen]


def _sample_rows(
    seqs: list[_Sequence], scores: torch.Tensor, rows: list[int], chosen: list[int]
) -> None:
    """Sample `rows` in one batch: temperature, top-k (as Hugging Face's warper: below
    the k-th best score is out), then top-p.

    Top-p without sorting the vocabulary: draw from the whole (tempered, top-k)
    distribution, and keep the draw if it lies in the nucleus, that is if the tokens more
    likely than it hold less than `top_p` of the mass; else draw again. What is kept is
    distributed exactly as the nucleus renormalised, and a draw is kept with probability
    at least `top_p`. Each row draws from its own random generator, so a seeded row
    samples the same whatever else is in the batch.

    A row whose tempered distribution is not usable (a temperature so small that the
    division overflows: infinities, then NaN probabilities) takes the distribution's
    limit as the temperature goes to 0: its greedy token. The rows' scores must be
    usable (see `sample_next_tokens`)."""
    import torch

    device = scores.device
    params = [seqs[row].request.params for row in rows]
    temperature = torch.tensor([p.temperature for p in params], device=device)
    raw = scores.index_select(0, torch.tensor(rows, device=device))
    scaled = raw / temperature.unsqueeze(1)
    ks = [max(0, min(p.top_k, scaled.shape[-1])) for p in params]
    cut = [i for i, k in enumerate(ks) if k > 0]  # the rows with a top-k
    if cut:
        some = torch.tensor(cut, device=device)
        best = scaled.index_select(0, some).topk(max(ks), dim=-1).values
        kth = scaled.new_full((len(rows), 1), float("-inf"))  # no cut: nothing is below
        kth[some] = best.gather(1, torch.tensor([[ks[i] - 1] for i in cut], device=device))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    total = probs.sum(dim=-1, keepdim=True)  # not finite if any probability is not
    usable = total.isfinite() & (total > 0)
    if not bool(usable.all()):  # such a row draws its argmax
        greedy = torch.zeros_like(probs).scatter_(1, raw.argmax(dim=-1, keepdim=True), 1.0)
        probs = torch.where(usable, probs, greedy)
    top_p = torch.tensor([p.top_p for p in params], device=device)
    pending = list(range(len(rows)))
    for _ in range(NUCLEUS_DRAWS):
        if not pending:
            return
        index = torch.tensor(pending, device=device)
        p = probs.index_select(0, index)
        tokens = _inverse_cdf(p, _uniform(seqs, [rows[i] for i in pending], device))
        picked = p.gather(1, tokens)
        more_likely = torch.where(p > picked, p, 0.0).sum(dim=-1)
        kept = ((picked.squeeze(1) > 0) & (more_likely < top_p.index_select(0, index))).tolist()
        for i, keep, token in zip(pending, kept, tokens.flatten().tolist(), strict=True):
            if keep:
                chosen[rows[i]] = token
        pending = [i for i, keep in zip(pending, kept, strict=True) if not keep]
    if pending:  # a narrow nucleus in a flat distribution: rank these rows' tokens
        index = torch.tensor(pending, device=device)
        ranked, ids = probs.index_select(0, index).sort(dim=-1, descending=True)
        before = ranked.cumsum(dim=-1) - ranked  # the mass of the more likely tokens
        ranked[before >= top_p.index_select(0, index).unsqueeze(1)] = 0.0  # rank 0 stays
        picks = _inverse_cdf(ranked, _uniform(seqs, [rows[i] for i in pending], device))
        picks = torch.minimum(picks, (ranked > 0).sum(dim=-1, keepdim=True) - 1).clamp_(min=0)
        for i, token in zip(pending, ids.gather(1, picks).flatten().tolist(), strict=True):
            chosen[rows[i]] = token


NUCLEUS_DRAWS = 8
"""Draws before a row's nucleus is found by sorting instead. A draw lands in the nucleus
with probability at least top-p, so with top-p 0.5 or more eight misses in a row happen
less than once in 250 rows."""


def _uniform(seqs: list[_Sequence], rows: list[int], device: torch.device) -> torch.Tensor:
    """One uniform number per row, each from the row's own random generator."""
    import torch

    return torch.cat([torch.rand(1, generator=seqs[row].generator, device=device) for row in rows])


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """For each row of (unnormalised) `probs`, the index where `uniform` falls in its
    cumulative distribution: a draw, as a [rows, 1] tensor of indices."""
    import torch

    cdf = probs.cumsum(dim=-1)
    target = (uniform * cdf[:, -1]).unsqueeze(1)
    return torch.searchsorted(cdf, target, right=True).clamp_(max=probs.shape[-1] - 1)
