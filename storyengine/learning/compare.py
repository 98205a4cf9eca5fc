"""`storyengine adapters compare A B`: what two adapter versions (or the base model)
write from the same prompts, with the same seeds, side by side, each continuation with
its reward model score, so a person can see what a round learned."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from ..errors import InvalidInput

if TYPE_CHECKING:
    from pathlib import Path

    from ..config import Settings

BASE = "base"


@dataclass(frozen=True)
class Side:
    """One of the two things compared: an adapter version, or the base model (path None)."""

    label: str
    path: Path | None


@dataclass(frozen=True)
class Comparison:
    prompts: list[str]
    a: Side
    b: Side
    texts_a: list[str]
    texts_b: list[str]
    scores_a: list[float] | None
    """The reward model's scores (None: no reward model is promoted)."""
    scores_b: list[float] | None
    reward: str | None
    """Which reward model scored them."""

    def lines(self, width: int = 100) -> list[str]:
        """The comparison as text: per prompt, each side's continuation and score; then
        the mean scores and how often B scored higher."""
        import textwrap

        def block(side: Side, text: str, score: float | None) -> list[str]:
            head = f"  {side.label}" + (f" (reward {score:+.2f})" if score is not None else "")
            body = textwrap.wrap(text.strip() or "(nothing)", width - 4) or [""]
            return [head + ":", *[f"    {line}" for line in body]]

        out: list[str] = []
        for i, prompt in enumerate(self.prompts):
            out.append(f"[{i + 1}] {prompt}")
            out += block(self.a, self.texts_a[i], self.scores_a[i] if self.scores_a else None)
            out += block(self.b, self.texts_b[i], self.scores_b[i] if self.scores_b else None)
            out.append("")
        if self.scores_a and self.scores_b:
            mean_a = sum(self.scores_a) / len(self.scores_a)
            mean_b = sum(self.scores_b) / len(self.scores_b)
            wins = sum(b > a for a, b in zip(self.scores_a, self.scores_b, strict=True))
            out.append(
                f"reward ({self.reward}): {self.a.label} {mean_a:+.2f} on average, "
                f"{self.b.label} {mean_b:+.2f}; {self.b.label} scored higher on {wins} of "
                f"{len(self.prompts)} prompts"
            )
        else:
            out.append("no reward model is promoted: continuations are shown without scores")
        return out


def default_prompts(n: int) -> list[str]:
    """Openings (two sentences) of the held-out stories shipped in the package: prompts
    no round ever trained on."""
    from ..text import split_sentences
    from .rounds import heldout_stories

    openings = [" ".join(split_sentences(story)[:2]) for story in heldout_stories()]
    return [o for o in openings if o][:n]


async def resolve_side(registry: Any, wanted: str) -> Side:
    """`VERSION`, `vVERSION` or `base` to what it names, or a clear error."""
    word = wanted.strip().lower()
    if word == BASE:
        return Side("base model", None)
    number = word.removeprefix("v")
    if not number.isdigit():
        raise InvalidInput(f"compare wants adapter version numbers or base, got {wanted!r}")
    version = await registry.get(int(number))
    if version is None:
        raise InvalidInput(f"There is no adapter version {number}.")
    if not (version.path / "adapter_config.json").is_file():
        raise InvalidInput(f"Adapter {version.name} is missing on disk ({version.path}).")
    return Side(version.name, version.path)


async def compare_adapters(
    settings: Settings,
    a: str,
    b: str,
    *,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    seed: int = 0,
    community: str | None = None,
) -> Comparison:
    """Continue each prompt with `a` and with `b` (the same seed for both), and score
    every continuation with the reward model promoted for `community` (else the shared
    one), when there is one."""
    from ..storage.store import Store
    from .registry import AdapterRegistry
    from .reward import RewardRegistry, reward_dir

    if not prompts:
        raise InvalidInput("compare needs at least one prompt")
    if not settings.has_database:
        raise InvalidInput(f"{settings.db_path} does not exist: there are no adapters to compare.")
    store = await Store(settings.database).open()
    try:
        adapters = AdapterRegistry(store, settings.adapter_dir)
        side_a, side_b = await resolve_side(adapters, a), await resolve_side(adapters, b)
        rewards = RewardRegistry(store, reward_dir(settings), lock_dir=settings.adapter_dir)
        reward_version = (await rewards.promoted(community) if community else None) or (
            await rewards.promoted()
        )
    finally:
        await store.close()
    return await asyncio.to_thread(
        _compare, settings, side_a, side_b, list(prompts), max_new_tokens, seed, reward_version
    )


def _compare(
    settings: Settings,
    a: Side,
    b: Side,
    prompts: list[str],
    max_new_tokens: int,
    seed: int,
    reward_version: Any,
) -> Comparison:
    from ..sampling import SamplingParams
    from ..serving.modeling import LoadedModel, load_model
    from .evaluation import sample_each
    from .reward import RewardModel

    loaded = load_model(settings.replace(adapter=None))
    model: Any = loaded.model
    names: dict[str, str | None] = {}
    for key, side in (("a", a), ("b", b)):
        if side.path is None:
            names[key] = None
            continue
        if not hasattr(model, "peft_config"):
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(side.path), adapter_name=key)
        else:
            model.load_adapter(str(side.path), adapter_name=key)
        names[key] = key
    model.eval()
    params = SamplingParams(max_new_tokens=max_new_tokens)
    texts_a, texts_b = sample_each(
        model, loaded.tokenizer, [names["a"], names["b"]], prompts, params, seed=seed
    )
    scores_a = scores_b = None
    if reward_version is not None:
        base = LoadedModel(model, loaded.tokenizer, loaded.model_id, None, loaded.device)
        scorer = RewardModel.load(reward_version.path, base)  # it reads the base model only
        scores_a, scores_b = scorer.score(prompts, texts_a), scorer.score(prompts, texts_b)
    return Comparison(
        prompts,
        a,
        b,
        texts_a,
        texts_b,
        scores_a,
        scores_b,
        reward_version.name if reward_version is not None else None,
    )
