"""Decoding attention read by groups of rows of like length (`grouped_attention`)."""

from itertools import pairwise

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from storyengine.sampling import SamplingParams
from storyengine.serving import gpt2_decode, grouped_attention
from storyengine.serving.generation import GenerationRequest
from storyengine.serving.grouped_attention import RowGroup, grouped_rows, plan_groups
from storyengine.serving.scheduler import BatchingGenerator


def test_rows_of_one_length_are_one_unmasked_group():
    assert plan_groups([50, 50, 50], width=80) == [RowGroup(0, 3, 30, masked=False)]


def test_long_and_short_rows_are_read_apart():
    groups = plan_groups([300, 300, 20, 20], width=300, overhead=256)
    assert groups == [RowGroup(0, 2, 0, masked=False), RowGroup(2, 4, 280, masked=False)]


def test_rows_of_nearly_one_length_stay_together_when_a_call_costs_more():
    assert plan_groups([100, 99, 98], width=100, overhead=256) == [RowGroup(0, 3, 0, masked=True)]
    free_calls = plan_groups([100, 99, 98], width=100, overhead=0)
    assert [(g.start, g.stop) for g in free_calls] == [(0, 1), (1, 2), (2, 3)]


def test_the_plan_reads_the_fewest_positions():
    lengths = [400, 390, 200, 190, 180, 30, 10, 10]
    groups = plan_groups(lengths, width=400, overhead=100)
    cost = sum((g.stop - g.start) * (400 - g.column) + 100 for g in groups)
    one_group = len(lengths) * 400 + 100
    each_alone = sum(lengths) + 100 * len(lengths)
    assert cost < min(one_group, each_alone)
    assert groups[0].start == 0 and groups[-1].stop == len(lengths)
    assert all(a.stop == b.start for a, b in pairwise(groups))


def test_rows_must_come_longest_first():
    with pytest.raises(ValueError, match="longest first"):
        plan_groups([10, 20], width=20)


class _Module(torch.nn.Module):
    is_causal = True


def _left_padded_batch(lengths, width, heads=2, dim=8):
    torch.manual_seed(0)
    q = torch.randn(len(lengths), heads, 1, dim)
    k = torch.randn(len(lengths), heads, width, dim)
    v = torch.randn(len(lengths), heads, width, dim)
    columns = torch.arange(width)
    mask = columns >= width - torch.tensor(lengths).unsqueeze(1)
    return q, k, v, mask[:, None, None, :]


def test_grouped_attention_equals_attention_over_the_whole_width():
    lengths = [40, 40, 31, 9, 9, 2]
    q, k, v, mask = _left_padded_batch(lengths, width=40)
    expected, _ = sdpa_attention_forward(_Module(), q, k, v, mask, scaling=0.3)
    for overhead in (0, 8, 10_000):  # many groups, some, one
        groups = plan_groups(lengths, width=40, overhead=overhead)
        with grouped_rows(groups):
            actual, _ = grouped_attention.attention(_Module(), q, k, v, mask, scaling=0.3)
        torch.testing.assert_close(actual, expected, atol=1e-6, rtol=1e-5)


def test_outside_a_grouped_block_it_is_sdpa():
    q, k, v, mask = _left_padded_batch([5, 3], width=5)
    expected, _ = sdpa_attention_forward(_Module(), q, k, v, mask)
    actual, _ = grouped_attention.attention(_Module(), q, k, v, mask)
    assert torch.equal(actual, expected)


def test_installing_leaves_the_model_outputs_unchanged():
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, vocab_size=100)).eval()
    ids = torch.randint(0, 100, (2, 12))
    mask = torch.ones_like(ids)
    mask[1, :4] = 0  # left padding
    with torch.no_grad():
        before = model(input_ids=ids, attention_mask=mask).logits
        assert grouped_attention.install(model)
        assert model.config._attn_implementation == grouped_attention.NAME
        after = model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(before, after)
    assert grouped_attention.install(model)  # twice is harmless


def test_a_model_without_sdpa_attention_is_left_alone():
    config = GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100)
    model = GPT2LMHeadModel(config)
    model.set_attn_implementation("eager")
    assert not grouped_attention.install(model)
    assert model.config._attn_implementation == "eager"


def _spy(seen):
    real = grouped_attention.attend

    def attend(query, key, value, mask, groups, scale):
        seen.append(list(groups))
        return real(query, key, value, mask, groups, scale)

    return attend


async def _alone_and_together(model, requests):
    alone = []
    for request in requests:
        scheduler = BatchingGenerator(model)
        alone.append((await scheduler.submit(request).result()).token_ids)
        await scheduler.close()
    scheduler = BatchingGenerator(model)
    handles = [scheduler.submit(r) for r in requests]
    together = [(await h.result()).token_ids for h in handles]
    await scheduler.close()
    return alone, together


GREEDY = SamplingParams(max_new_tokens=6, temperature=0.0, repetition_penalty=1.0)


async def test_the_scheduler_decodes_mixed_lengths_by_groups(tiny_model, monkeypatch):
    """Rows sorted longest first, read by groups: two prompts of 200 tokens and two of 3
    decode in two unmasked groups, and each output equals what it is alone."""
    seen: list[list[RowGroup]] = []
    monkeypatch.setattr(gpt2_decode, "attend", _spy(seen))
    ids = tiny_model.encode("Once upon a time there was a fox who lived in the woods. " * 16)
    requests = [GenerationRequest(ids[:n], GREEDY) for n in (3, 200, 3, 200)]
    alone, together = await _alone_and_together(tiny_model, requests)
    assert together == alone
    # The short rows skip the long ones' padding (once all four run together).
    assert [RowGroup(0, 2, 0, False), RowGroup(2, 4, 200 - 3, False)] in seen


async def test_other_models_decode_by_groups_through_transformers(monkeypatch):
    """A model that is not GPT-2 (a tiny Llama) takes transformers' forward pass, with
    the grouped attention registered for it."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from storyengine.config import bundled_model_path
    from storyengine.serving.modeling import LoadedModel

    tokenizer = AutoTokenizer.from_pretrained(bundled_model_path(), local_files_only=True)
    torch.manual_seed(0)
    config = LlamaConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=256,
        bos_token_id=0,
        eos_token_id=0,
        pad_token_id=0,
    )
    llama = LlamaForCausalLM(config).eval()
    model = LoadedModel(llama, tokenizer, "test:tiny-llama", None, torch.device("cpu"))
    seen: list[list[RowGroup]] = []
    monkeypatch.setattr(grouped_attention, "attend", _spy(seen))
    ids = model.encode("Once upon a time there was a fox who lived in the woods. " * 16)
    requests = [GenerationRequest(ids[:n], GREEDY) for n in (3, 200, 3, 200)]
    alone, together = await _alone_and_together(model, requests)
    assert llama.config._attn_implementation == grouped_attention.NAME
    assert together == alone
    assert [RowGroup(0, 2, 0, False), RowGroup(2, 4, 200 - 3, False)] in seen
