"""The reward model's pairs for a round's training: judged on the training side only,
and sampled by the round itself while people's are few (West-of-N).

A server's first rounds hold a handful of preference pairs, far too few for DPO to move
the adapter; its reward model, judged on all of people's feedback, may already rank
continuations well. So a round whose lineage has a reward model in service continues
the prompts people were shown (the newest on the training side of the split), several
times each, with the adapter it starts from, polishes them as the storyteller polishes
what it shows, and takes the best over the worst of each prompt as a pair when a judge
scores them far enough apart (`DatasetConfig.on_policy_margin`): the same kind of pair
as the served turns' on-policy ones (`datasets.on_policy_pairs`), at the same weight
below a person's, only more of them.

The judge is a head like the one in service but fitted, in the round, on the training
side of the split only (the one in service, judged by cross-validation while feedback
is scarce, learned from held-out stories too, and may have learned from feedback since
forgotten): the served turns' pairs are kept only where it agrees (`agreed`), and it
ranks the sampled ones. So nothing an adapter learns comes from the held-out feedback
its gate judges it with.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from ..options import check_options, option
from ..sampling import SamplingParams
from .datasets import DatasetConfig, FeedbackDatasets, PreferencePair, best_and_worst


@dataclass(frozen=True)
class SampledPairsConfig:
    prompts: int = option(
        48, low=1, help="prompts people were shown that a round continues to make pairs from"
    )
    candidates: int = option(4, low=2, high=16, help="continuations written per prompt")
    while_pairs_below: int = option(
        32,
        low=0,
        help="only while the round has fewer preference pairs than this to train on (0: never)",
    )
    """Once people (and the served turns' on-policy pairs) give this many, their pairs
    are enough and the round spends no time sampling."""
    max_new_tokens: int = option(64, low=1, high=512, help="tokens per sampled continuation")

    def __post_init__(self) -> None:
        check_options(self)


def prompts_to_sample(data: FeedbackDatasets, n: int) -> list[tuple[str, int]]:
    """The newest `n` distinct prompts of training-side feedback, each with its story:
    what people were shown, in stories that may be trained on (consent and forget-me
    already applied by `build_datasets`)."""
    seen: dict[str, tuple[int, int]] = {}  # prompt -> (newest generation, story)
    for p in data.pairs:
        if p.split == "train" and p.source != "reward":
            newest = max(p.chosen_generation_id, p.rejected_generation_id)
            if newest >= seen.get(p.prompt, (-1, 0))[0]:
                seen[p.prompt] = (newest, p.story_id)
    for e in data.examples:
        if e.split == "train" and e.generation_id >= seen.get(e.prompt, (-1, 0))[0]:
            seen[e.prompt] = (e.generation_id, e.story_id)
    newest_first = sorted(seen.items(), key=lambda item: item[1][0], reverse=True)
    return [(prompt, story) for prompt, (_, story) in newest_first[:n]]


def best_over_worst(
    prompts: Sequence[tuple[str, int]],
    candidates: Sequence[Sequence[str]],
    scores: Sequence[Sequence[float]],
    data: DatasetConfig,
) -> list[PreferencePair]:
    """Each prompt's best-scored candidate over its worst (`datasets.best_and_worst`),
    weighing `data.on_policy_weight`."""
    pairs = []
    for (prompt, story), texts, values in zip(prompts, candidates, scores, strict=True):
        found = best_and_worst(texts, values, data)
        if found is None:
            continue
        best, worst = found
        pairs.append(
            PreferencePair(
                prompt,
                texts[best],
                texts[worst],
                "reward",
                story,
                "train",
                0,
                0,
                data.on_policy_weight,
            )
        )
    return pairs


def agreed(
    judge: Any, pairs: Sequence[PreferencePair], data: DatasetConfig
) -> list[PreferencePair]:
    """The pairs whose chosen side `judge` (a `RewardModel`) scores above the rejected
    side by more than `data.on_policy_margin` (blocking)."""
    if not pairs:
        return []
    prompts = [p.prompt for p in pairs]
    scores = judge.score(prompts + prompts, [p.chosen for p in pairs] + [p.rejected for p in pairs])
    n = len(pairs)
    return [p for i, p in enumerate(pairs) if scores[i] - scores[n + i] > data.on_policy_margin]


def sample_pairs(
    policy: Any,
    tokenizer: Any,
    adapter: str | None,
    judge: Any,
    prompts: Sequence[tuple[str, int]],
    config: SampledPairsConfig,
    sampling: SamplingParams,
    data: DatasetConfig,
    *,
    polish: Callable[[str], str],
    max_prompt_tokens: int,
    seed: int = 0,
) -> list[PreferencePair]:
    """Continue each prompt `config.candidates` times with `adapter` on `policy` (a peft
    model; each prompt cut to its last `max_prompt_tokens`, as the storyteller's turns
    are), `polish` them as the storyteller does what it shows, score them with `judge`
    (a `RewardModel`, which reads the base model under the policy's LoRA layers: they
    are switched off while it does) and keep `best_over_worst` (blocking: run it in a
    worker thread)."""
    from .evaluation import sample_continuations

    if not prompts:
        return []
    n = config.candidates
    params = sampling.replace(max_new_tokens=config.max_new_tokens)
    asked = [prompt for prompt, _ in prompts for _ in range(n)]
    raw = sample_continuations(
        policy, tokenizer, adapter, asked, params, seed=seed, max_prompt_tokens=max_prompt_tokens
    )
    texts = [polish(text) for text in raw]
    with policy.disable_adapter():
        values = judge.score(asked, texts)
    groups = [texts[i * n : (i + 1) * n] for i in range(len(prompts))]
    scores = [values[i * n : (i + 1) * n] for i in range(len(prompts))]
    return best_over_worst(prompts, groups, scores, data)
