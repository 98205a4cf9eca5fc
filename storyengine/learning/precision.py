"""The precision of measuring passes: bfloat16 where the CPU multiplies it natively.

A round measures more than it trains: the drift guard takes the held-out perplexity
after its checkpoints, the gate takes it again, and the reward model reads the base
model's hidden states of every text it learns from or ranks. On a CPU with native
bfloat16 arithmetic (AVX512-BF16 or AMX), those forward passes of the bundled model run
2.2 to 2.4 times faster under bfloat16 autocast than in float32 (two cores: 40
held-out stories' perplexity 1.7 s against 3.9 s; reward features 372 texts a second
against 154), and the figures move by less than a thousandth: perplexity 9.2348
against 9.2379, features within 0.15 % of their largest value.

Only measurements that are compared with measurements taken the same way use it
(perplexity against perplexity, a reward model's scores against its own): the held-out
log-likelihoods that rank the gate's preference pairs, the training steps and the
storyteller's own decoding keep the model's precision. Small models (narrower than
`MIN_WIDTH`, such as the tests' tiny ones) and models not in float32 are measured as
they are, as is every model on a GPU or on a CPU without native bfloat16.
"""

from __future__ import annotations

import contextlib
import functools
from contextlib import AbstractContextManager
from typing import Any

MIN_WIDTH = 256
"""Narrower models keep float32: their matrices are too small for bfloat16 to pay for
its conversions (not measured below the bundled model's 384), and the tests' tiny
models (32 wide) keep figures they compare exactly."""


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (AVX512-BF16 or AMX tiles)."""
    import torch

    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    try:
        return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)
    except Exception:  # a torch without these private probes: assume not
        return False


def measuring(model: Any) -> AbstractContextManager[Any]:
    """The precision to measure `model` in: bfloat16 autocast on a CPU with native
    bfloat16 for a float32 model at least `MIN_WIDTH` wide; else nothing changes."""
    import torch

    try:
        parameter = next(model.parameters())
    except StopIteration:
        return contextlib.nullcontext()
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    width = getattr(getattr(inner, "config", None), "hidden_size", 0) or 0
    if (
        parameter.device.type != "cpu"
        or parameter.dtype != torch.float32
        or width < MIN_WIDTH
        or not cpu_has_native_bf16()
    ):
        return contextlib.nullcontext()
    return torch.autocast("cpu", dtype=torch.bfloat16)
