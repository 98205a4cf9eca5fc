"""Sampling parameters refuse what cannot be decoded safely, with a message for the user."""

import dataclasses
import math
import re

import pytest
import torch

from storyengine.errors import InvalidInput
from storyengine.sampling import MIN_TEMPERATURE, MIN_TOP_P, PRESETS, SamplingParams

FLOAT_FIELDS = [f.name for f in dataclasses.fields(SamplingParams) if f.type == "float"]


@pytest.mark.parametrize("temperature", [1e-38, 1e-3, MIN_TEMPERATURE / 2])
def test_a_temperature_too_small_to_divide_by_is_refused(temperature):
    message = f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}"
    with pytest.raises(InvalidInput, match=re.escape(message)):
        SamplingParams(temperature=temperature)
    assert SamplingParams(temperature=0.0).greedy
    assert SamplingParams(temperature=MIN_TEMPERATURE).temperature == MIN_TEMPERATURE
    assert all(
        p.params.temperature >= MIN_TEMPERATURE or p.params.greedy or p.params.beam_search
        for p in PRESETS.values()
    )


def test_the_bundled_models_logits_stay_finite_at_the_smallest_temperature(bundled_model):
    """Why MIN_TEMPERATURE is safe: the bundled model's logits divided by it are finite in
    float32 (where both samplers temper) and even in float16; so are logits of 1e4 in
    float32."""
    ids = torch.tensor([bundled_model.encode("Once upon a time, a little fox found a key.")])
    with torch.no_grad():
        logits = bundled_model.model(input_ids=ids).logits[0]
    for dtype in (torch.float32, torch.float16):
        tempered = logits.to(dtype) / torch.tensor(MIN_TEMPERATURE, dtype=dtype)
        assert torch.isfinite(tempered).all(), dtype
        assert torch.isfinite(tempered.float().softmax(-1)).all(), dtype
    assert torch.isfinite(torch.tensor([-1e4, 1e4]) / MIN_TEMPERATURE).all()


@pytest.mark.parametrize("top_p", [1e-50, 1e-4])
def test_a_nucleus_too_narrow_to_hold_a_token_is_refused(top_p):
    """1e-50 is 0 in float32: a nucleus that holds no token."""
    message = f"top_p must be between {MIN_TOP_P} and 1"
    with pytest.raises(InvalidInput, match=re.escape(message)):
        SamplingParams(top_p=top_p)
    assert SamplingParams(top_p=MIN_TOP_P).top_p == MIN_TOP_P


@pytest.mark.parametrize("value", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("name", FLOAT_FIELDS)
def test_nan_and_infinities_are_refused_for_every_float_field(name, value):
    with pytest.raises(InvalidInput, match=name):
        SamplingParams(**{name: value})


def test_every_float_field_is_checked():
    assert FLOAT_FIELDS == ["temperature", "top_p", "repetition_penalty", "length_penalty"]


def test_one_translation_for_transformers_generate():
    from storyengine.sampling import SamplingParams

    sampled = SamplingParams(temperature=0.8, top_p=0.9, top_k=40, max_new_tokens=20)
    assert sampled.generate_kwargs() == {
        "max_new_tokens": 20,
        "repetition_penalty": sampled.repetition_penalty,
        "no_repeat_ngram_size": sampled.no_repeat_ngram_size,
        "do_sample": True,
        "temperature": 0.8,
        "top_p": 0.9,
        "top_k": 40,
    }
    assert SamplingParams(temperature=0.0).generate_kwargs()["do_sample"] is False
    beams = SamplingParams(num_beams=4, length_penalty=1.5).generate_kwargs()
    assert beams["num_beams"] == 4 and beams["length_penalty"] == 1.5
    assert beams["do_sample"] is False and "temperature" not in beams
