# pyright: reportAttributeAccessIssue=false, reportIndexIssue=false, reportCallIssue=false
# pyright: reportArgumentType=false, reportOperatorIssue=false, reportReturnType=false
# pyright: reportGeneralTypeIssues=false, reportOptionalMemberAccess=false, reportAssignmentType=false
# (This module walks transformers' and peft's module trees by name; torch types every
# submodule attribute as `Tensor | Module`, which makes these checks noise here.)
"""Many LoRA adapters in one batch: each row of a batch with its own adapter.

peft can mix adapters in one batch (`adapter_names=`), but it loops over the adapters
in every LoRA layer, slicing the batch into sub-batches; on small models that Python
work costs as much as the matrix work. Here each LoRA layer keeps all its adapters
side by side, `A_all = [A_1 | A_2 | ...]` and `B_all = [s_1 B_1 ; s_2 B_2 ; ...]`, and
one pass computes, for every row at once,

    delta = ((x @ A_all) * row_mask) @ B_all

where `row_mask` keeps only the columns of that row's adapter (all zero for the base
model). Three matrix operations per layer, whatever the mix. Only the columns of the
adapters the batch's rows use are read (the span from the first to the last of them),
and a batch whose rows all use one adapter needs no mask: `(x @ A_i) @ s_i B_i`. A
server with eight adapters loaded that decodes one of them would otherwise multiply by
all eight (about a third more arithmetic per step on the bundled model).

The batched path is used only inside `MultiLoRA.rows(...)` on the thread that entered
it; everywhere else (training, `generate`, other threads) the layers behave exactly as
peft's own.
"""

from __future__ import annotations

import threading
import types
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .generation import BASE_ADAPTER


class MultiLoRA:
    """Use `MultiLoRA.attach(model)`: one instance per model, shared by every generator
    that serves it (the layers' forward is rerouted once)."""

    @classmethod
    def attach(cls, peft_model: nn.Module) -> MultiLoRA:
        existing = getattr(peft_model, "_multilora", None)
        if isinstance(existing, cls):
            existing.refresh()
            return existing
        multi = cls(peft_model)
        peft_model._multilora = multi
        return multi

    def __init__(self, peft_model: nn.Module) -> None:
        self.model = peft_model
        self._local = threading.local()
        self._layers: list[nn.Module] = []
        self.refresh()

    def refresh(self) -> None:
        """Re-read every adapter's weights (after adapters are added, removed or trained),
        rerouting any LoRA layer that is new."""
        self._layers = [
            m for m in self.model.modules() if hasattr(m, "lora_A") and hasattr(m, "base_layer")
        ]
        for layer in self._layers:
            if not hasattr(layer, "_multilora_peft_forward"):
                layer._multilora_peft_forward = layer.forward
                layer.forward = types.MethodType(_make_forward(self), layer)
        with torch.no_grad():
            for layer in self._layers:
                names = [n for n in layer.lora_A if n not in layer.lora_variant]
                # An adapter with weights that are not finite would spread NaN to every
                # row of the product (0 * NaN): its blocks are zero, and its rows' mask
                # NaN (`_columns`), so that only its own rows come out NaN.
                broken = {
                    n
                    for n in names
                    if not (
                        torch.isfinite(layer.lora_A[n].weight).all()
                        and torch.isfinite(layer.lora_B[n].weight).all()
                    )
                }
                a = [
                    torch.zeros_like(layer.lora_A[n].weight.t())
                    if n in broken
                    else layer.lora_A[n].weight.t()
                    for n in names
                ]
                b = [
                    torch.zeros_like(layer.lora_B[n].weight.t())
                    if n in broken
                    else layer.lora_B[n].weight.t() * layer.scaling[n]
                    for n in names
                ]
                layer._multilora_broken = frozenset(broken)
                spans, start = {}, 0
                for name, block in zip(names, a, strict=True):
                    spans[name] = (start, start + block.shape[1])
                    start += block.shape[1]
                layer._multilora_a = torch.cat(a, dim=1).contiguous() if a else None
                layer._multilora_b = torch.cat(b, dim=0).contiguous() if b else None
                layer._multilora_spans = spans
        self._local.masks = {}

    @contextmanager
    def rows(self, adapter_names: Sequence[str]) -> Iterator[None]:
        """Within this block, on this thread, row i of every batch uses adapter
        `adapter_names[i]` (`BASE_ADAPTER` for none)."""
        self._local.rows = list(adapter_names)
        self._local.masks = {}
        try:
            yield
        finally:
            self._local.rows = None
            self._local.masks = {}

    def add_delta(self, layer: nn.Module, x: torch.Tensor, result: torch.Tensor) -> torch.Tensor:
        """`result` (the base layer's output for `x`) plus each row's own adapter's delta.
        Only within `rows(...)`, on its thread. `x`'s first dimension is the rows (or,
        with one row, its tokens)."""
        if layer._multilora_a is None:
            return result
        used = self._columns(layer, result)
        if used is None:
            return result
        lo, hi, mask = used
        a = layer._multilora_a[:, lo:hi].to(x.dtype)
        b = layer._multilora_b[lo:hi].to(x.dtype)
        if mask is None:  # every row uses this one adapter
            return result + (x @ a) @ b
        return result + ((x @ a) * mask) @ b

    @property
    def layers(self) -> list[nn.Module]:
        """The LoRA layers, rerouted."""
        return self._layers

    def _columns(
        self, layer: nn.Module, like: torch.Tensor
    ) -> tuple[int, int, torch.Tensor | None] | None:
        """The columns of `A_all` (rows of `B_all`) this batch reads, `lo` to `hi`, and
        the row mask over them (None: every row uses the one adapter there, so none is
        needed). None: no row uses an adapter of this layer."""
        spans: dict[str, tuple[int, int]] = layer._multilora_spans
        broken = layer._multilora_broken
        key = (tuple(spans.items()), broken, like.dtype, like.device, like.dim())
        found: dict[Any, Any] = self._local.masks
        if key not in found:
            rows: list[str] = self._local.rows
            used = {name for name in rows if name != BASE_ADAPTER and name in spans}
            if not used:
                found[key] = None
            else:
                lo = min(spans[name][0] for name in used)
                hi = max(spans[name][1] for name in used)
                mask = None
                if len(set(rows)) > 1 or used & broken:  # mixed rows, or NaN to spread
                    shape = (len(rows), *([1] * (like.dim() - 2)), hi - lo)
                    mask = torch.zeros(shape, dtype=like.dtype, device=like.device)
                    for row, name in enumerate(rows):
                        if name in used:
                            start, stop = spans[name]
                            mask[row, ..., start - lo : stop - lo] = (
                                float("nan") if name in broken else 1
                            )
                found[key] = (lo, hi, mask)
        return found[key]


def _make_forward(multi: MultiLoRA) -> Any:
    def forward(layer: nn.Module, x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        if getattr(multi._local, "rows", None) is None or layer._multilora_a is None:
            return layer._multilora_peft_forward(x, *args, **kwargs)
        return multi.add_delta(layer, x, layer.base_layer(x, *args, **kwargs))

    return forward
