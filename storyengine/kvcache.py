"""A KV cache for the batching scheduler that grows in place.

transformers' `DynamicLayer` concatenates each step's keys and values onto the cache,
which copies the whole cache on every decoding step. `GrowableLayer` keeps buffers with
spare room and writes each step into them; the batch is only copied when sequences join
or leave (`load`).
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

    @classmethod
    def from_tensors(cls, kv: KV) -> GrowableCache:
        cache = cls()
        cache.load(kv)
        return cache

    def load(self, kv: KV) -> None:
        """Replace every layer's contents (used when the batch's rows change)."""
        while len(self.layers) < len(kv):
            self.layers.append(GrowableLayer())
        for layer, (k, v) in zip(self.layers, kv, strict=True):
            layer.load(k, v)

    def tensors(self) -> KV:
        return [(layer.keys, layer.values) for layer in self.layers]
