"""Simulated audiences for `storyengine bench learning`: tastes as plain functions.

A taste receives a continuation (and the prompt, as a keyword argument) and returns
True (👍), False (👎) or None (no reaction). `--taste MODULE:FUNCTION` names any such
function.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Callable

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


def load_taste(spec: str) -> Taste:
    """`module:function` → the function."""
    module_name, sep, function = spec.partition(":")
    if not sep or not module_name or not function:
        raise ValueError(f"--taste wants MODULE:FUNCTION, got {spec!r}")
    taste = getattr(importlib.import_module(module_name), function, None)
    if not callable(taste):
        raise ValueError(f"{spec!r} is not a function")
    return taste
