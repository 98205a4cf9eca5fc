"""The lean GPT-2 decoding step against transformers' forward pass."""

import inspect
from contextlib import nullcontext

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import DynamicCache, GPT2Config, GPT2LMHeadModel

from storyengine.serving import gpt2_decode, grouped_attention
from storyengine.serving.generation import BASE_ADAPTER
from storyengine.serving.grouped_attention import RowGroup
from storyengine.serving.kvcache import GrowableCache
from storyengine.serving.multilora import MultiLoRA

LENGTHS = [11, 11, 7, 2]  # longest first, as the scheduler keeps its rows


def _cache(network, cache):
    """transformers renamed `past_key_values` to `cache` (5.2x): either spelling."""
    params = inspect.signature(network.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def _prefilled(network, ids, lengths):
    """A left-padded batch after prefill: its cache (transformers' and ours) and mask."""
    width = max(lengths)
    mask = (torch.arange(width) >= width - torch.tensor(lengths).unsqueeze(1)).long()
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    cache = DynamicCache()
    network(input_ids=ids, attention_mask=mask, position_ids=positions, **_cache(network, cache))
    ours = GrowableCache()
    ours.assemble([[(layer.keys, layer.values)] for layer in cache.layers], width)
    return cache, ours, mask


def _next_step(network, cache, ours, mask, rows, groups, lora=None):
    """Next-token logits from transformers' forward and from `decode_step`."""
    torch.manual_seed(1)
    ids = torch.randint(0, 100, (len(mask),))
    positions = mask.sum(1)
    step_mask = torch.cat([mask, mask.new_ones((len(mask), 1))], dim=1)
    with lora.rows(rows) if lora else nullcontext():
        expected = network(
            input_ids=ids.unsqueeze(1),
            attention_mask=step_mask,
            position_ids=positions.unsqueeze(1),
            **_cache(network, cache),
        ).logits[:, -1]
        actual = gpt2_decode.decode_step(
            network, ids, positions, step_mask.bool()[:, None, None, :], ours, groups, lora
        )
    return expected, actual


def _tiny_gpt2(seed=0):
    torch.manual_seed(seed)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=100, n_positions=64)
    return GPT2LMHeadModel(config).eval()


@torch.no_grad()
def test_a_step_equals_the_forward_pass_bit_for_bit():
    network = _tiny_gpt2()
    ids = torch.randint(0, 100, (len(LENGTHS), max(LENGTHS)))
    cache, ours, mask = _prefilled(network, ids, LENGTHS)
    whole = [RowGroup(0, len(LENGTHS), 0, masked=True)]
    expected, actual = _next_step(network, cache, ours, mask, None, whole)
    assert torch.equal(actual, expected)
    assert ours.layers[0].keys.shape[2] == max(LENGTHS) + 1  # the cache grew by one


@torch.no_grad()
def test_a_step_read_by_groups_equals_the_forward_pass():
    network = _tiny_gpt2()
    ids = torch.randint(0, 100, (len(LENGTHS), max(LENGTHS)))
    cache, ours, mask = _prefilled(network, ids, LENGTHS)
    groups = grouped_attention.plan_groups(LENGTHS, max(LENGTHS), overhead=0)
    assert len(groups) == 3
    expected, actual = _next_step(network, cache, ours, mask, None, groups)
    torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


@torch.no_grad()
def test_each_row_gets_its_own_adapter():
    lora = {
        "r": 4,
        "target_modules": ["c_attn", "c_proj", "c_fc"],
        "fan_in_fan_out": True,
        "init_lora_weights": False,
    }
    peft_model = get_peft_model(_tiny_gpt2(), LoraConfig(**lora), adapter_name="fox")
    peft_model.add_adapter("owl", LoraConfig(**lora))
    peft_model.eval()
    multi = MultiLoRA.attach(peft_model)
    network = peft_model.get_base_model()
    assert gpt2_decode.supports(network, multi)
    rows = ["fox", "owl", BASE_ADAPTER, "owl"]
    ids = torch.randint(0, 100, (len(LENGTHS), max(LENGTHS)))
    with multi.rows(rows):
        cache, ours, mask = _prefilled(network, ids, LENGTHS)
    whole = [RowGroup(0, len(LENGTHS), 0, masked=True)]
    expected, actual = _next_step(network, cache, ours, mask, rows, whole, multi)
    assert torch.equal(actual, expected)
    # and the adapters matter: the same step with the base model everywhere differs
    bare = [BASE_ADAPTER] * len(rows)
    with multi.rows(bare):
        cache, ours, mask = _prefilled(network, ids, LENGTHS)
    _, without = _next_step(network, cache, ours, mask, bare, whole, multi)
    assert not torch.allclose(without[:2], actual[:2])
    torch.testing.assert_close(without[2], actual[2])  # row 2 had no adapter either way


@pytest.mark.parametrize("target", ["lm_head", "wte"])
def test_adapters_outside_the_blocks_linears_take_the_full_forward(target):
    config = {"r": 2, "target_modules": ["c_attn", target], "init_lora_weights": False}
    peft_model = get_peft_model(_tiny_gpt2(), LoraConfig(**config), adapter_name="x")
    multi = MultiLoRA.attach(peft_model)
    assert not gpt2_decode.supports(peft_model.get_base_model(), multi)


def test_dora_adapters_take_the_full_forward():
    config = {"r": 2, "target_modules": ["c_attn"], "use_dora": True, "fan_in_fan_out": True}
    peft_model = get_peft_model(_tiny_gpt2(), LoraConfig(**config), adapter_name="d")
    assert not gpt2_decode.supports(peft_model.get_base_model(), MultiLoRA.attach(peft_model))


def test_other_architectures_take_the_full_forward():
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        vocab_size=100,
    )
    assert not gpt2_decode.supports(LlamaForCausalLM(config), None)
    assert gpt2_decode.supports(_tiny_gpt2(), None)


@torch.no_grad()
@pytest.mark.parametrize("with_lora", [False, True])
def test_a_prefill_equals_the_forward_pass_bit_for_bit(with_lora):
    network, multi, rows = _tiny_gpt2(), None, nullcontext()
    if with_lora:
        config = {
            "r": 4,
            "target_modules": ["c_attn", "c_proj", "c_fc"],
            "init_lora_weights": False,
        }
        peft_model = get_peft_model(network, LoraConfig(**config), adapter_name="fox").eval()
        multi = MultiLoRA.attach(peft_model)
        network, rows = peft_model.get_base_model(), multi.rows(["fox"])
    ids = torch.randint(0, 100, (13,))
    cache = DynamicCache()
    with rows:
        expected = network(
            input_ids=ids.unsqueeze(0), logits_to_keep=1, **_cache(network, cache)
        ).logits[:, -1]
    with multi.rows(["fox"]) if multi else nullcontext():
        logits, kvs = gpt2_decode.prefill(network, ids, multi)
    assert torch.equal(logits, expected)
    for (key, value), layer in zip(kvs, cache.layers, strict=True):
        assert torch.equal(key, layer.keys) and torch.equal(value, layer.values)
