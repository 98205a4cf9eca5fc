"""Simulated audiences for `storyengine bench learning`: tastes as plain functions.

A taste receives a continuation (and the prompt, as a keyword argument) and returns
True (👍), False (👎) or None (no reaction). `--taste NAME` picks a shipped one (`SHIPPED`:
a topic, two moods, a form and a style); `--taste MODULE:FUNCTION` names any function.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable
from typing import cast

Taste = Callable[..., bool | None]

ANIMALS = (
    "cat",
    "kitten",
    "dog",
    "puppy",
    "bird",
    "fox",
    "rabbit",
    "bunny",
    "bear",
    "mouse",
    "duck",
    "frog",
    "horse",
    "cow",
    "pig",
    "sheep",
    "owl",
    "lion",
    "fish",
    "squirrel",
    "monkey",
    "elephant",
    "tiger",
    "turtle",
    "bee",
    "butterfly",
    "deer",
    "wolf",
    "goat",
)
_ANIMAL = re.compile(r"\b(" + "|".join(ANIMALS) + r")s?\b", re.IGNORECASE)
_CHEERFUL = re.compile(
    r"\b(happy|happily|smiled?|smiling|laugh(?:ed|ing)?|fun|joy|glad|giggled?|hug(?:ged)?|love[ds]?)\b",
    re.IGNORECASE,
)


def _repetitive(text: str) -> bool:
    words = text.lower().split()
    grams = [tuple(words[i : i + 3]) for i in range(len(words) - 2)]
    return bool(grams) and len(set(grams)) < 0.8 * len(grams)


def likes_animals(continuation: str, *, prompt: str = "") -> bool | None:
    """👍 when an animal appears in the continuation, 👎 otherwise or when it repeats itself."""
    if not continuation.strip():
        return None
    if _repetitive(continuation):
        return False
    return bool(_ANIMAL.search(continuation))


def likes_cheerful(continuation: str, *, prompt: str = "") -> bool | None:
    """👍 for a cheerful continuation (happy words), 👎 otherwise or when it repeats itself."""
    if not continuation.strip():
        return None
    if _repetitive(continuation):
        return False
    return bool(_CHEERFUL.search(continuation))


_GLOOMY = re.compile(
    r"\b(sad|sadly|cr(?:y|ied|ying)|tears?|scared|afraid|lonely|alone|dark|angry|lost|hurt)\b",
    re.IGNORECASE,
)
_QUOTED = re.compile(r"[\"“][^\"”]{2,}[\"”]")


def likes_gloomy(continuation: str, *, prompt: str = "") -> bool | None:
    """👍 for a gloomy continuation (sad or scared words), 👎 otherwise or when it repeats
    itself: the opposite of `likes_cheerful`."""
    if not continuation.strip():
        return None
    if _repetitive(continuation):
        return False
    return bool(_GLOOMY.search(continuation))


def likes_dialogue(continuation: str, *, prompt: str = "") -> bool | None:
    """👍 when someone speaks (a quoted phrase), 👎 for narration only or repetition: a
    taste for a form of writing, not for a topic."""
    if not continuation.strip():
        return None
    if _repetitive(continuation):
        return False
    return bool(_QUOTED.search(continuation))


def likes_short_sentences(continuation: str, *, prompt: str = "") -> bool | None:
    """👍 when the sentences are short (8 words or fewer on average), 👎 otherwise: a taste
    for a style, measured on the whole text."""
    sentences = [s for s in re.split(r"(?<=[.!?])\s+", continuation.strip()) if s.strip()]
    if not sentences:
        return None
    if _repetitive(continuation):
        return False
    return sum(len(s.split()) for s in sentences) / len(sentences) <= 8


SHIPPED = {
    "animals": likes_animals,
    "cheerful": likes_cheerful,
    "gloomy": likes_gloomy,
    "dialogue": likes_dialogue,
    "short": likes_short_sentences,
}
"""Tastes by short name (`--taste cheerful`, `--communities "animals,gloomy"`)."""


def load_taste(spec: str) -> Taste:
    """A shipped taste's short name (`animals`), or `module:function` → the function."""
    if spec in SHIPPED:
        return SHIPPED[spec]
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise ValueError(
            f"--taste wants one of {', '.join(SHIPPED)} or MODULE:FUNCTION, got {spec!r}"
        )
    taste = getattr(importlib.import_module(module_name), function, None)
    if not callable(taste):
        raise ValueError(f"{spec!r} is not a function")
    return cast(Taste, taste)
