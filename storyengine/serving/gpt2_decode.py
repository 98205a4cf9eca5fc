# pyright: reportAttributeAccessIssue=false, reportIndexIssue=false, reportCallIssue=false
# pyright: reportArgumentType=false, reportOperatorIssue=false, reportReturnType=false
# pyright: reportGeneralTypeIssues=false, reportOptionalMemberAccess=false, reportAssignmentType=false
# (This module walks transformers' and peft's module trees by name; torch types every
# submodule attribute as `Tensor | Module`, which makes these checks noise here.)
"""A GPT-2 model's prefill and decoding steps, straight from its weights.

A decoding step of a small model is mostly overhead: on a 2-core CPU, a one-token
forward pass of the bundled model through transformers' and peft's modules takes about
10 ms, of which about 4 ms is arithmetic. At a batch of 16, the module layers still cost
about 5 ms a step. `decode_step` does the same arithmetic, in the same order, without
the layers around it: layer norms, each Conv1D as one `addmm`, each row's LoRA delta
(`MultiLoRA`), the model's own activation module, SDPA with the model's scaling. Its
logits equal the model's forward pass bit for bit (tests/test_gpt2_decode.py). `prefill`
does the same for one prompt (4 to 24 ms less per prompt of 16 to 320 tokens).

Only plain GPT-2 language models qualify (`supports`), with plain LoRA on the blocks'
four linear layers at most; any other model decodes through transformers' forward.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING

import torch
from torch import Tensor, nn
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
    # A LoRA variant (DoRA and the like) is computed by peft's own layer, not here.
    return all(id(layer) in linears and not layer.lora_variant for layer in lora.layers)


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
    h = _embed(network, input_ids, positions)
    for block, layer in zip(network.transformer.h, cache.layers, strict=True):

        def attention(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
            keys, values = layer.update(key, value)  # noqa: B023 (called right away)
            return attend(query, keys, values, mask, groups, scale)

        h = _block(block, h, len(input_ids), attention, lora)
    return _logits(network, h)


def prefill(
    network: nn.Module, input_ids: torch.Tensor, lora: MultiLoRA | None
) -> tuple[torch.Tensor, list[tuple[torch.Tensor, torch.Tensor]]]:
    """One prompt ([tokens]) through the model: the logits after its last token
    ([1, vocab]) and each layer's keys and values ([1, heads, tokens, head_dim]). Call it
    within `lora.rows([adapter])` when there is a `lora`."""
    positions = torch.arange(len(input_ids), device=input_ids.device)
    h = _embed(network, input_ids, positions)
    kvs = []
    for block in network.transformer.h:

        def attention(query: Tensor, key: Tensor, value: Tensor, scale: float) -> Tensor:
            kvs.append((key, value))
            return F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scale)

        h = _block(block, h, 1, attention, lora)
    return _logits(network, h[-1:]), kvs


def _embed(network: nn.Module, input_ids: Tensor, positions: Tensor) -> Tensor:
    model = network.transformer
    return F.embedding(input_ids, model.wte.weight) + F.embedding(positions, model.wpe.weight)


def _block(
    block: nn.Module,
    h: Tensor,
    rows: int,
    attention: Callable[[Tensor, Tensor, Tensor, float], Tensor],
    lora: MultiLoRA | None,
) -> Tensor:
    """One GPT-2 block on `h` ([rows * tokens, width]): attention, then the MLP."""
    attn, mlp = block.attn, block.mlp
    qkv = _linear(attn.c_attn, _layer_norm(block.ln_1, h), lora)
    shape = (rows, -1, attn.num_heads, attn.head_dim)
    query, key, value = (t.view(shape).transpose(1, 2) for t in qkv.split(attn.split_size, 1))
    out = attention(query, key, value, attn.scaling)  # [rows, heads, tokens, head_dim]
    h = _linear(attn.c_proj, out.transpose(1, 2).reshape(h.shape), lora) + h
    inner = mlp.act(_linear(mlp.c_fc, _layer_norm(block.ln_2, h), lora))
    return _linear(mlp.c_proj, inner, lora) + h


def _logits(network: nn.Module, h: Tensor) -> Tensor:
    return F.linear(_layer_norm(network.transformer.ln_f, h), network.lm_head.weight)


def _layer_norm(norm: nn.LayerNorm, x: Tensor) -> Tensor:
    return F.layer_norm(x, norm.normalized_shape, norm.weight, norm.bias, norm.eps)


def _linear(module: nn.Module, x: Tensor, lora: MultiLoRA | None) -> Tensor:
    """A GPT-2 Conv1D (weight [in, out]), or peft's LoRA layer around one."""
    conv = getattr(module, "base_layer", module)
    out = torch.addmm(conv.bias, x, conv.weight)
    if lora is not None and conv is not module:
        out = lora.add_delta(module, x, out)
    return out
