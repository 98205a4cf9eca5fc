"""Measuring passes in bfloat16 where the CPU computes it natively (`precision`): which
models qualify, and that the figures stay those of float32 to within a thousandth."""

import contextlib

import pytest
import torch

from storyengine.learning import precision
from storyengine.learning.evaluation import perplexity
from storyengine.learning.precision import measuring
from storyengine.learning.reward import FeatureSpec, continuation_features

STORIES = [
    "Once upon a time, there was a little girl named Lily. She loved to play outside in "
    "the sun. One day, she found a big red ball in the park and ran home to show her mom.",
    "Tom had a small dog. The dog liked to run and jump. Tom and the dog went to the "
    "beach, and they played in the water all day until the sun went down.",
]


@pytest.fixture
def native_bf16(monkeypatch):
    """As on a CPU with native bfloat16 (autocast computes the same anywhere, slower)."""
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)


def test_only_wide_float32_models_on_a_cpu_with_native_bf16_are_measured_in_bf16(
    monkeypatch, native_bf16, bundled_model, tiny_model
):
    assert isinstance(measuring(bundled_model.model), torch.autocast)
    assert isinstance(measuring(tiny_model.model), contextlib.nullcontext)  # 32 wide
    half = torch.nn.Linear(2, 2).to(torch.bfloat16)
    assert isinstance(measuring(half), contextlib.nullcontext)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    assert isinstance(measuring(bundled_model.model), contextlib.nullcontext)


def test_bf16_perplexity_and_features_are_float32_s_within_a_thousandth(monkeypatch, bundled_model):
    model, tok = bundled_model.model, bundled_model.tokenizer
    spec = FeatureSpec()
    prompts = ["Once upon a time, Lily went to the park."] * 2
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: False)
    exact = perplexity(model, tok, None, STORIES)
    exact_features = continuation_features(bundled_model, spec, prompts, STORIES)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    fast = perplexity(model, tok, None, STORIES)
    fast_features = continuation_features(bundled_model, spec, prompts, STORIES)
    assert fast != exact  # it did run in bfloat16
    assert fast == pytest.approx(exact, rel=1e-3)
    assert fast_features.dtype == torch.float32
    scale = float(exact_features.abs().max())
    assert float((fast_features - exact_features).abs().max()) < 5e-3 * scale
