"""The model runner: the model, the network forward passes call, and the batch's KV cache.

The scheduler decides who runs; the runner runs them. It owns the torch side of
continuous batching:

    prefill  one prompt through the model on its own (no padding): its last logits and
             each layer's keys and values; a best-of-n group's prompt once for all its
             rows
    join     newcomers' caches merged into the batch's one left-padded cache, in one copy
    decode   one forward pass for every row of the batch, each row with its own LoRA
             adapter (for GPT-2 models, a lean step straight from the weights:
             `gpt2_decode`); the logits of each row's next token
    leave    finished rows dropped from the cache, which shrinks with them

The batch's rows stay sorted longest first, so that on a CPU each decoding step's
attention reads the cache by groups of rows of like length rather than over the whole
left-padded width (`grouped_attention`). Rows are numbers here: the runner knows no
requests, handles, queues or threads, and samples nothing (`sampler`). It is used from
the scheduler's worker thread alone.
"""

from __future__ import annotations

import ctypes
import inspect
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast

from . import gpt2_decode, grouped_attention
from .generation import vocabulary_size
from .kvcache import KV, GrowableCache
from .multilora import MultiLoRA

if TYPE_CHECKING:
    import torch

    from .modeling import LoadedModel

TRIM_EVERY_S = 10.0
"""How often, at most, leaving rows hands freed memory back to the system."""


@dataclass(frozen=True)
class Prefilled:
    """A prompt run through the model, to join the batch as `rows` rows (a best-of-n
    group's candidates share it)."""

    length: int
    """Tokens in the prompt (the positions its cache holds)."""
    rows: int
    logits: torch.Tensor
    """The scores of the token after the prompt, [rows, vocab] (one row's, repeated)."""
    kv: KV
    """One row of keys and values per layer; each of the `rows` rows gets a copy."""


class ModelRunner:
    """Prefill, join, decode and leave for one batch of rows on `model`."""

    def __init__(self, model: LoadedModel) -> None:
        self.model = model
        self.cache: GrowableCache | None = None
        self.mask: torch.Tensor | None = None
        """True where a row's cache holds a token; each row is False, then True."""
        self.groups: list[grouped_attention.RowGroup] | None = None
        """How decoding attention reads the rows (None: all rows over the whole width)."""
        self._trim = _malloc_trim()
        self._trimmed_at = time.monotonic()
        self.attach()
        # transformers renamed `past_key_values` to `cache` (5.2x); accept either.
        params = inspect.signature(self.network.forward).parameters
        self._cache_kwarg = "cache" if "cache" in params else "past_key_values"

    def attach(self) -> None:
        """What forward passes call: the base network, with per-row LoRA when the model
        has adapters (call again after adapters are loaded or unloaded)."""
        model = self.model
        self.network = model.model.get_base_model() if model.is_peft else model.model
        self.lora = MultiLoRA.attach(model.model) if model.is_peft else None
        # Grouped reads pay off where attention is bound by memory reads and calls are
        # cheap: on the CPU. On a GPU each group would cost kernel launches per layer.
        sdpa = grouped_attention.install(self.network)
        self.grouping = sdpa and model.device.type == "cpu"
        # GPT-2 decodes through a lean step (same arithmetic, none of the module layers).
        self.lean = sdpa and gpt2_decode.supports(self.network, self.lora)
        self.vocabulary = vocabulary_size(model)

    def unload(self, adapters: Iterable[str]) -> None:
        """Delete these adapters from the model (no row may be using them)."""
        with self.model.mutation_lock:
            for name in adapters:
                self.model.delete_adapter(name)
        self.attach()

    # -- prefill and join ---------------------------------------------------------

    def prefill(self, tokens: list[int], adapter: str, rows: int = 1) -> Prefilled:
        """A prompt through the model once, for `rows` rows that start from it."""
        import torch
        from transformers import DynamicCache

        device = self.model.device
        if self.lean:
            with self.lora.rows([adapter]) if self.lora else nullcontext():
                last, kv = gpt2_decode.prefill(
                    self.network, torch.tensor(tokens, device=device), self.lora
                )
            return Prefilled(len(tokens), rows, last.float().expand(rows, -1), kv)
        ids = torch.tensor([tokens], device=device)
        cache = DynamicCache()
        last = self._forward(
            ids,
            torch.ones_like(ids),
            torch.arange(len(tokens), device=device).unsqueeze(0),
            cache,
            [adapter],
        )
        layers = cast(list[Any], cache.layers)  # our own `GrowingLayer`s
        kv = [(layer.keys, layer.values) for layer in layers]
        return Prefilled(len(tokens), rows, last.expand(rows, -1), kv)

    def join(self, newcomers: list[Prefilled]) -> list[tuple[int | None, int]]:
        """Add the newcomers' rows to the batch in one copy: every row right-aligned to
        the widest, rows sorted longest first, a newcomer's rows side by side.

        Returns where each row of the new batch comes from, in order: (None, its row
        in the batch before) or (newcomer, which of its rows)."""
        import torch

        old_lengths = self.mask.sum(1).tolist() if self.mask is not None else []
        # (length, None, old row) or (length, newcomer, 0); stable: old rows first on ties.
        rows = sorted(
            [(length, None, row) for row, length in enumerate(old_lengths)]
            + [(p.length, i, 0) for i, p in enumerate(newcomers)],
            key=lambda r: -r[0],
        )
        pieces: list[tuple[int | None, int, int]] = []  # consecutive old rows: one slice
        for _, newcomer, row in rows:
            if newcomer is None and pieces and pieces[-1][0] is None and pieces[-1][2] == row:
                pieces[-1] = (None, pieces[-1][1], row + 1)
            else:
                pieces.append((newcomer, row, row + 1))
        old = self.cache.tensors() if self.cache is not None else []

        def part(newcomer: int | None, a: int, b: int, layer: int) -> tuple[Any, Any]:
            if newcomer is None:
                return old[layer][0][a:b], old[layer][1][a:b]
            k, v = newcomers[newcomer].kv[layer]  # one row: a view of it for each row
            n = newcomers[newcomer].rows
            return k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)

        layers = len(newcomers[0].kv)
        parts = [[part(*piece, layer) for piece in pieces] for layer in range(layers)]
        old_width = self.mask.shape[1] if self.mask is not None else 0
        width = max(old_width, rows[0][0])
        if self.cache is None:
            self.cache = GrowableCache()
        self.cache.assemble(parts, width)
        order: list[tuple[int | None, int]] = []
        lengths: list[int] = []
        for length, newcomer, row in rows:
            if newcomer is None:
                order.append((None, row))
                lengths.append(length)
            else:
                n = newcomers[newcomer].rows
                order += [(newcomer, i) for i in range(n)]
                lengths += [length] * n
        columns = torch.arange(width, device=self.model.device)
        self.mask = columns >= width - torch.tensor(lengths, device=columns.device)[:, None]
        self._plan_groups()
        return order

    # -- decode and leave ---------------------------------------------------------

    def decode(self, tokens: list[int], positions: list[int], adapters: list[str]) -> torch.Tensor:
        """One step for every row: each row's last token at its position, through its
        adapter. Returns the next token's scores, [rows, vocab] in float32; each row's
        cache grows by one."""
        import torch

        assert self.mask is not None and self.cache is not None
        device = self.model.device
        rows = len(tokens)
        ids = torch.tensor(tokens, device=device)
        position_ids = torch.tensor(positions, device=device)
        mask = torch.cat([self.mask, self.mask.new_ones((rows, 1))], dim=1)
        if self.lean:
            groups = self.groups or [grouped_attention.RowGroup(0, rows, 0, masked=True)]
            with self.lora.rows(adapters) if self.lora else nullcontext():
                logits = gpt2_decode.decode_step(
                    self.network,
                    ids,
                    position_ids,
                    mask[:, None, None, :],
                    self.cache,
                    groups,
                    self.lora,
                ).float()
        else:
            # Grouped attention slices a 4-D mask (transformers passes one through as is).
            model_mask = mask[:, None, None, :] if self.groups else mask
            logits = self._forward(
                ids.unsqueeze(1),
                model_mask,
                position_ids.unsqueeze(1),
                self.cache,
                adapters,
                self.groups,
            )
        self.mask = mask
        return logits

    def retire(self, keep: list[int]) -> None:
        """Keep only these rows (sorted row numbers), in their order; the others leave
        and the cache shrinks with them."""
        import torch

        if not keep:
            self.clear()
            self._give_back_memory(idle=True)
            return
        assert self.cache is not None and self.mask is not None
        index = torch.tensor(keep, device=self.mask.device)
        mask = self.mask.index_select(0, index)
        # Drop leading columns that are padding for every remaining row.
        start = int((mask.sum(0) > 0).nonzero()[0])
        self.mask = mask[:, start:]
        runs = _runs(keep)  # the kept rows, as slices: views, copied once by assemble
        self.cache.assemble(
            [
                [(k[a:b, :, start:], v[a:b, :, start:]) for a, b in runs]
                for k, v in self.cache.tensors()
            ],
            self.mask.shape[1],
        )
        self._plan_groups()
        self._give_back_memory()

    def clear(self) -> None:
        """Every row leaves: no cache."""
        self.cache, self.mask, self.groups = None, None, None

    # -- helpers ------------------------------------------------------------------

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
            self.lora.rows(adapters) if self.lora else nullcontext(),
            grouped_attention.grouped_rows(groups) if groups else nullcontext(),
        ):
            out = self.network(
                input_ids=input_ids,
                attention_mask=attention_mask,
                position_ids=position_ids,
                use_cache=True,
                logits_to_keep=1,
                **kwargs,
            )
        return out.logits[:, -1, :].float()

    def _plan_groups(self) -> None:
        """Group the rows for decoding attention (after the batch changed: between
        changes every row grows by one token a step, so the groups' columns hold)."""
        if not self.grouping or self.mask is None:
            self.groups = None
            return
        lengths = [int(n) for n in self.mask.sum(1).tolist()]
        self.groups = grouped_attention.plan_groups(lengths, self.mask.shape[1])

    def _give_back_memory(self, *, idle: bool = False) -> None:
        """Hand the memory that left rows' caches freed back to the system: when the
        batch empties, else at most every `TRIM_EVERY_S`.

        Each batch change assembles the cache into new buffers and frees the old ones.
        glibc keeps freed memory in its arenas for the next allocations and never hands
        those buffers back (its mmap threshold rises to their size), so a process that
        once ran a full batch kept that memory, idle or not. Pages handed back are faulted
        in again at the next batch change, hence the interval."""
        now = time.monotonic()
        if self._trim is not None and (idle or now - self._trimmed_at >= TRIM_EVERY_S):
            self._trim(0)
            self._trimmed_at = now


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
