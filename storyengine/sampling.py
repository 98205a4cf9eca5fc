"""Sampling parameters and the named style presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from .errors import InvalidInput

MIN_TEMPERATURE = 0.05
"""The lowest temperature that samples (0 decodes greedily). Logits are divided by the
temperature in float32 (the scheduler and transformers' `generate` both cast them first):
at 0.05, logits of 1e4 become 2e5, far from float32's limit (3e38), and the bundled
model's logits (within about ±18, in float32 and float16 alike) stay within ±360, finite
even in float16 (65504). Far below it the division overflows (1e-38 turns logits into
infinities, then NaN probabilities); and long before that sampling is greedy in all but
name: at 0.05 a logit gap of 1 already weighs e^20 to 1."""

MIN_TOP_P = 0.01
"""The narrowest nucleus. Below it the nucleus is almost always the single most likely
token (greedy in all but name), and a top-p that rounds to 0 in float32 holds no token."""


MAX_BEST_OF = 8


@dataclass(frozen=True)
class SamplingParams:
    """How one continuation is decoded.

    `num_beams > 1` switches from sampling to beam search (with `length_penalty`);
    `temperature == 0` means greedy decoding.
    """

    temperature: float = 0.85
    top_p: float = 0.95
    top_k: int = 50
    repetition_penalty: float = 1.2
    no_repeat_ngram_size: int = 3
    max_new_tokens: int = 80
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    best_of: int = 1
    """Continuations written per turn when a reward model is served: the one it scores
    best is shown, the others kept as alternatives (1: one, as without a reward model)."""

    def __post_init__(self) -> None:
        # NaN and infinities fail every comparison below, so they are refused too.
        checks: list[tuple[bool, str]] = [
            (0.0 <= self.temperature <= 2.0, "temperature must be between 0 and 2"),
            (
                self.temperature == 0.0 or self.temperature >= MIN_TEMPERATURE,
                f"temperature must be 0 (greedy) or at least {MIN_TEMPERATURE}",
            ),
            (MIN_TOP_P <= self.top_p <= 1.0, f"top_p must be between {MIN_TOP_P} and 1"),
            (
                isinstance(self.best_of, int) and 1 <= self.best_of <= MAX_BEST_OF,
                f"best_of must be 1..{MAX_BEST_OF}",
            ),
            (self.top_k >= 0, "top_k must be 0 (off) or more"),
            (1.0 <= self.repetition_penalty <= 2.0, "repetition_penalty must be between 1 and 2"),
            (0 <= self.no_repeat_ngram_size <= 10, "no_repeat_ngram_size must be 0..10"),
            (1 <= self.max_new_tokens <= 512, "max_new_tokens must be 1..512"),
            (1 <= self.num_beams <= 8, "num_beams must be 1..8"),
            (-5.0 <= self.length_penalty <= 5.0, "length_penalty must be -5..5"),
        ]
        for ok, message in checks:
            if not ok:
                raise InvalidInput(message)

    @property
    def greedy(self) -> bool:
        return self.num_beams == 1 and self.temperature == 0.0

    @property
    def beam_search(self) -> bool:
        return self.num_beams > 1

    def replace(self, **changes: Any) -> SamplingParams:
        """A copy with `changes` applied; `None` values leave a field as it is."""
        return dataclasses.replace(self, **{k: v for k, v in changes.items() if v is not None})

    def generate_kwargs(self) -> dict[str, Any]:
        """These parameters as transformers' `generate()` takes them: the one
        translation, for sequential generation and the gate's samples alike (the
        batching scheduler samples with its own sampler from the parameters)."""
        kwargs: dict[str, Any] = {
            "max_new_tokens": self.max_new_tokens,
            "repetition_penalty": self.repetition_penalty,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        if self.beam_search:
            kwargs.update(num_beams=self.num_beams, length_penalty=self.length_penalty)
            kwargs.update(do_sample=False)
        elif self.greedy:
            kwargs.update(do_sample=False)
        else:
            kwargs.update(
                do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k
            )
        return kwargs

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SamplingParams:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    params: SamplingParams = field(default_factory=SamplingParams)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "balanced",
            "Sampled, varied but on track (the default).",
            SamplingParams(),
        ),
        Preset(
            "gentle",
            "Calm and predictable: low temperature, narrow nucleus.",
            SamplingParams(temperature=0.6, top_p=0.9, top_k=40, repetition_penalty=1.15),
        ),
        Preset(
            "wild",
            "Surprising turns: high temperature, wide nucleus.",
            SamplingParams(temperature=1.1, top_p=0.98, top_k=0, repetition_penalty=1.1),
        ),
        Preset(
            "focused",
            "Beam search: the most likely continuation, no randomness.",
            SamplingParams(
                temperature=0.0, num_beams=4, length_penalty=1.0, repetition_penalty=1.2
            ),
        ),
    )
}

DEFAULT_PRESET = "balanced"


def preset(name: str) -> Preset:
    try:
        return PRESETS[name.strip().lower()]
    except KeyError:
        names = ", ".join(PRESETS)
        raise InvalidInput(f"Unknown preset {name!r}. Choose one of: {names}.") from None
