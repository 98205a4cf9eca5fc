"""One decoding step of a GPT-2 model, straight from its weights.

A decoding step of a small model is mostly overhead: on a 2-core CPU, a one-token
forward pass of the bundled model through transformers' and peft's modules takes about
10 ms, of which about 4 ms is arithmetic. At a batch of 16, the module layers still cost
about 5 ms a step. `decode_step` does the same arithmetic, in the same order, without
the layers around it: layer norms, each Conv1D as one `addmm`, each row's LoRA delta
(`MultiLoRA`), the model's own activation module, SDPA with the model's scaling. Its
logits equal the model's forward pass bit for bit (tests/test_gpt2_decode.py).

Only plain GPT-2 language models qualify (`supports`), with LoRA on the blocks' four
linear layers at most; any other model decodes through transformers' forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.nn import functional as F

from .grouped_attention import RowGroup, attend

if TYPE_CHECKING:
    from .kvcache import GrowableCache
    from .multilora import MultiLoRA

_LINEARS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def supports(network: nn.Module, lora: MultiLoRA | None) -> bool:
    """True when `decode_step` computes exactly what `network`'s forward would."""
    from transformers import GPT2LMHeadModel

    if type(network) is not GPT2LMHeadModel or network.config.add_cross_attention:
        return False
    if lora is None:
        return True
    linears = {
        id(block.get_submodule(name)) for block in network.transformer.h for name in _LINEARS
    }
    return all(id(layer) in linears for layer in lora.layers)


def decode_step(
    network: nn.Module,
    input_ids: torch.Tensor,
    positions: torch.Tensor,
    mask: torch.Tensor,
    cache: GrowableCache,
    groups: list[RowGroup],
    lora: MultiLoRA | None,
) -> torch.Tensor:
    """The next-token logits for one new token per row. `input_ids` and `positions` are
    [rows]; `mask` is [rows, 1, 1, cache width + 1], True where a row attends; `cache`
    grows by one position. Call it within `lora.rows(...)` when there is a `lora`."""
    model = network.transformer
    h = F.embedding(input_ids, model.wte.weight) + F.embedding(positions, model.wpe.weight)
    rows, width = h.shape
    for block, layer in zip(model.h, cache.layers, strict=True):
        attn = block.attn
        qkv = _linear(attn.c_attn, _layer_norm(block.ln_1, h), lora)
        query, key, value = (
            t.view(rows, attn.num_heads, 1, attn.head_dim) for t in qkv.split(attn.split_size, 1)
        )
        keys, values = layer.update(key, value)
        out = attend(query, keys, values, mask, groups, attn.scaling)
        h = _linear(attn.c_proj, out.reshape(rows, width), lora) + h
        mlp = block.mlp
        inner = mlp.act(_linear(mlp.c_fc, _layer_norm(block.ln_2, h), lora))
        h = _linear(mlp.c_proj, inner, lora) + h
    return F.linear(_layer_norm(model.ln_f, h), network.lm_head.weight)


def _layer_norm(norm: nn.LayerNorm, x: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(module: nn.Module, x: torch.Tensor, lora: MultiLoRA | None) -> torch.Tensor:
    """A GPT-2 Conv1D (weight [in, out]), or peft's LoRA layer around one."""
    conv = getattr(module, "base_layer", module)
    out = torch.addmm(conv.bias, x, conv.weight)
    if lora is not None and conv is not module:
        out = lora.add_delta(module, x, out)
    return out
