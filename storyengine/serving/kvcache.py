# pyright: reportAttributeAccessIssue=false, reportIndexIssue=false, reportCallIssue=false
# pyright: reportArgumentType=false, reportOperatorIssue=false, reportReturnType=false
# pyright: reportGeneralTypeIssues=false, reportOptionalMemberAccess=false, reportAssignmentType=false
# (This module walks transformers' and peft's module trees by name; torch types every
# submodule attribute as `Tensor | Module`, which makes these checks noise here.)
"""A KV cache for the batching scheduler that grows in place.

transformers' `DynamicLayer` concatenates each step's keys and values onto the cache,
which copies the whole cache on every decoding step. `GrowableLayer` keeps buffers with
spare room and writes each step into them; the batch is only copied when sequences join
or leave (`assemble`, one copy of everything, straight into the new buffers).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache, DynamicLayer

KV = list[tuple[torch.Tensor, torch.Tensor]]


class GrowableLayer(DynamicLayer):
    headroom = 64

    def load(self, keys: torch.Tensor, values: torch.Tensor) -> None:
        """Replace the contents with a copy of `keys`/`values`, with room to grow."""
        self.device = keys.device
        self.is_initialized = True
        length = keys.shape[-2]
        shape = (*keys.shape[:-2], length + self.headroom, keys.shape[-1])
        self._k = keys.new_empty(shape)
        self._v = values.new_empty(shape)
        self._k[:, :, :length] = keys
        self._v[:, :, :length] = values
        self.keys, self.values = self._k[:, :, :length], self._v[:, :, :length]

    def assemble(self, parts: list[tuple[torch.Tensor, torch.Tensor]], width: int) -> None:
        """New contents in one copy: the parts' rows stacked in order, each part
        right-aligned to `width` positions (zeros before it), with room to grow."""
        first = parts[0][0]
        rows = sum(k.shape[0] for k, _ in parts)
        shape = (rows, first.shape[1], width + self.headroom, first.shape[-1])
        self.device = first.device
        self.is_initialized = True
        self._k, self._v = first.new_empty(shape), first.new_empty(shape)
        row = 0
        for k, v in parts:
            n, pad = k.shape[0], width - k.shape[-2]
            if pad:
                self._k[row : row + n, :, :pad].zero_()
                self._v[row : row + n, :, :pad].zero_()
            self._k[row : row + n, :, pad:width] = k
            self._v[row : row + n, :, pad:width] = v
            row += n
        self.keys, self.values = self._k[:, :, :width], self._v[:, :, :width]

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.load(key_states, value_states)
            return self.keys, self.values
        old = self.keys.shape[-2]
        new = old + key_states.shape[-2]
        if new > self._k.shape[-2]:
            self.headroom = max(64, new // 2)
            self.load(self.keys, self.values)
        self._k[:, :, old:new] = key_states
        self._v[:, :, old:new] = value_states
        self.keys, self.values = self._k[:, :, :new], self._v[:, :, :new]
        return self.keys, self.values


class GrowableCache(DynamicCache):
    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=GrowableLayer)

    def assemble(self, parts: list[KV], width: int) -> None:
        """Per layer, `parts[layer]` becomes its contents (see `GrowableLayer.assemble`):
        sequences join or leave the batch with one copy of the cache."""
        while len(self.layers) < len(parts):
            self.layers.append(GrowableLayer())
        for layer, layer_parts in zip(self.layers, parts, strict=True):
            layer.assemble(layer_parts, width)

    def tensors(self) -> KV:
        return [(layer.keys, layer.values) for layer in self.layers]
