"""The evaluation gate: is a newly trained adapter better, and no worse where it matters?

Measured on held-out data (stories on the held-out side of the split):
* preference accuracy: how often a model's implicit reward, log p_model(y|x) minus
  log p_base(y|x), ranks the chosen continuation over the rejected one, and a liked one
  over a disliked one (ties count half); the candidate must beat the base model and the
  adapter it would replace, each unless too little feedback is held out to tell them
  apart (`current_better_share`);
* perplexity on held-out story text, against both the current adapter (at most
  `max_ppl_increase` worse) and the bare base model (at most `max_ppl_vs_base` worse, so
  drift cannot pile up round after round);
* repetition (share of repeated 4-grams) and distinct-2 on sampled continuations, which
  may not get worse by more than a bound.
"""

from __future__ import annotations

import math
import random
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from itertools import pairwise
from typing import Any

from ..sampling import SamplingParams
from .datasets import LabelledExample, PreferencePair
from .precision import measuring
from .training import adapter_kwargs, evaluating


@dataclass(frozen=True)
class GateConfig:
    max_ppl_increase: float = 0.05
    max_ppl_vs_base: float = 0.05
    max_repeat4_increase: float = 0.02
    max_distinct2_drop: float = 0.05
    max_examples: int = 400
    """At most this many held-out examples are scored (they cost a forward pass each)."""
    samples: int = 32
    """Continuations sampled from each adapter for repetition and distinct-2 (0: skip)."""
    sample_tokens: int = 64
    confidence: float = 0.95
    """A candidate that does not beat the base model or the adapter in service is still
    promoted unless that one ranks the held-out feedback better in at least this share
    of resamples of the held-out stories (`current_better_share`)."""
    resamples: int = 1000
    """Resamples of the held-out stories for `current_better_share`."""

    def __post_init__(self) -> None:
        if not 0.5 < self.confidence <= 1:
            raise ValueError(f"confidence must be above 0.5 and at most 1, not {self.confidence}")
        if self.resamples < 1:
            raise ValueError(f"resamples must be at least 1, not {self.resamples}")


@dataclass(frozen=True)
class GateReport:
    passed: bool
    reasons: tuple[str, ...]
    preference_accuracy: float
    current_preference_accuracy: float
    perplexity: float
    current_perplexity: float
    base_perplexity: float
    repeat4: float | None = None
    current_repeat4: float | None = None
    distinct2: float | None = None
    current_distinct2: float | None = None
    heldout_pairs: int = 0
    heldout_examples: int = 0
    current_better: float | None = None
    """In what share of resamples of the held-out stories the adapter in service ranked
    the held-out feedback better than the candidate (None: not measured)."""
    base_better: float | None = None
    """The same against the base model."""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def implicit_rewards(
    model: Any,
    tokenizer: Any,
    adapter: str | None,
    items: Sequence[tuple[str, str]],
    base_logprobs: dict[tuple[str, str], float] | None = None,
    adapter_logprobs: dict[tuple[str, str], float] | None = None,
) -> dict[tuple[str, str], float]:
    """Each (prompt, continuation)'s log-likelihood under `adapter` less the base
    model's (0 for the base model itself), batched. `base_logprobs` and
    `adapter_logprobs` cache the base model's and the adapter's: what they hold is
    taken from there, what is measured is added."""
    from .training import completion_logprobs

    unique = list(dict.fromkeys(items))
    if adapter is None:
        return dict.fromkeys(unique, 0.0)
    base = base_logprobs if base_logprobs is not None else {}
    mine = adapter_logprobs if adapter_logprobs is not None else {}
    for known, name in ((base, None), (mine, adapter)):
        missing = [item for item in unique if item not in known]
        if missing:
            found = completion_logprobs(model, tokenizer, missing, adapter=name)
            known.update(zip(missing, found, strict=True))
    return {item: mine[item] - base[item] for item in unique}


def heldout_rewards(
    model: Any,
    tokenizer: Any,
    adapter: str | None,
    pairs: Sequence[PreferencePair],
    examples: Sequence[LabelledExample],
    base_logprobs: dict[tuple[str, str], float] | None = None,
    adapter_logprobs: dict[tuple[str, str], float] | None = None,
) -> dict[tuple[str, str], float]:
    """The adapter's implicit reward (`implicit_rewards`) of every continuation in
    held-out feedback."""
    return implicit_rewards(
        model,
        tokenizer,
        adapter,
        [(p.prompt, t) for p in pairs for t in (p.chosen, p.rejected)]
        + [(e.prompt, e.completion) for e in examples],
        base_logprobs,
        adapter_logprobs,
    )


def preference_accuracy(
    model: Any,
    tokenizer: Any,
    adapter: str | None,
    pairs: Sequence[PreferencePair],
    examples: Sequence[LabelledExample],
    base_logprobs: dict[tuple[str, str], float] | None = None,
) -> float:
    """How often the adapter's implicit reward (its log-likelihood ratio to the base
    model) ranks held-out feedback the way people did (`ranking_accuracy`).
    `base_logprobs`: the base model's log-likelihoods, filled in and reused (a gate
    judges two adapters on the same examples)."""
    rewards = heldout_rewards(model, tokenizer, adapter, pairs, examples, base_logprobs)
    return ranking_accuracy(rewards, pairs, examples)


def ranking_accuracy(
    rewards: Mapping[tuple[str, str], float],
    pairs: Sequence[PreferencePair],
    examples: Sequence[LabelledExample],
) -> float:
    """How often `rewards` rank held-out feedback the way people did: the chosen
    continuation of a pair above the rejected one, and a liked continuation above a
    disliked one (every liked one against every disliked one, the area under the ROC
    curve). Ties count half, so the base model itself, whose reward is zero everywhere,
    scores 0.5. The two kinds are weighted by how much evidence each holds
    (`evidence`), so one held-out pair cannot outweigh forty labels.

    Only the order of rewards matters, never their sign: preference training lowers the
    likelihood of most continuations, liked ones too, and what the audience can feel is
    whether liked ones became likelier than disliked ones. A rank statistic is also
    balanced by construction, so it stays meaningful when nearly all reactions are 👎,
    and comparing every liked with every disliked continuation uses all the labels a
    round holds out, not only the few pairs."""

    def reward(prompt: str, text: str) -> float:
        return rewards[(prompt, text)]

    kinds: list[tuple[float, float]] = []  # (accuracy, weight)
    if pairs:
        right = [_right(reward(p.prompt, p.chosen) - reward(p.prompt, p.rejected)) for p in pairs]
        kinds.append((sum(right) / len(right), evidence(len(pairs))))
    liked = [reward(e.prompt, e.completion) for e in examples if e.label]
    disliked = [reward(e.prompt, e.completion) for e in examples if not e.label]
    if liked and disliked:
        kinds.append((ranked_above(liked, disliked), evidence(len(liked), len(disliked))))
    total = sum(weight for _, weight in kinds)
    return sum(value * weight for value, weight in kinds) / total if kinds else 0.5


def current_better_share(
    candidate: Mapping[tuple[str, str], float],
    current: Mapping[tuple[str, str], float],
    pairs: Sequence[PreferencePair],
    examples: Sequence[LabelledExample],
    *,
    resamples: int = 1000,
    seed: int = 0,
) -> float | None:
    """In what share of bootstrap resamples of the held-out stories (drawn with
    replacement, each with all its feedback) `current`'s rewards rank the feedback
    better than `candidate`'s (`ranking_accuracy`; ties count half). Resamples with
    nothing to rank (no pair, and not both a liked and a disliked continuation) are
    left out rather than counted as ties, which would cap the share below any high
    confidence when the few liked continuations sit in few stories. None when fewer
    than two stories hold the feedback, or no resample has anything to rank: then
    there is no spread to measure.

    Near 1, the adapter in service is measurably better; near one half, the held-out
    feedback cannot tell the two apart. On a server's first few dozen reactions the
    held-out side holds a handful of 👍, and an adapter promoted on them may have
    scored high by chance: asking a later candidate to beat that score would keep
    the lucky adapter in service for good (seen: 0.93 on a few liked continuations,
    then every later round refused)."""
    pairs_of: dict[int, list[PreferencePair]] = defaultdict(list)
    examples_of: dict[int, list[LabelledExample]] = defaultdict(list)
    for p in pairs:
        pairs_of[p.story_id].append(p)
    for e in examples:
        examples_of[e.story_id].append(e)
    stories = sorted(pairs_of.keys() | examples_of.keys())
    if len(stories) < 2:
        return None
    rng = random.Random(seed)
    better, counted = 0.0, 0
    for _ in range(resamples):
        drawn = rng.choices(stories, k=len(stories))
        drawn_pairs = [p for story in drawn for p in pairs_of[story]]
        drawn_examples = [e for story in drawn for e in examples_of[story]]
        if not drawn_pairs and len({e.label for e in drawn_examples}) < 2:
            continue  # nothing to rank: says nothing about either
        mine = ranking_accuracy(candidate, drawn_pairs, drawn_examples)
        theirs = ranking_accuracy(current, drawn_pairs, drawn_examples)
        better += 1.0 if theirs > mine else 0.5 if theirs == mine else 0.0
        counted += 1
    return better / counted if counted else None


def evidence(pairs_or_liked: int, disliked: int | None = None) -> float:
    """How many independent comparisons a kind of held-out feedback is worth: its count
    for pairs; for liked against disliked labels, the harmonic mean of the two counts
    times two (1 liked and 40 disliked decide about as much as two pairs, not forty)."""
    if disliked is None:
        return float(pairs_or_liked)
    liked = pairs_or_liked
    return 2 * liked * disliked / (liked + disliked) if liked and disliked else 0.0


def _right(margin: float) -> float:
    return 1.0 if margin > 0 else 0.5 if margin == 0 else 0.0


def ranked_above(higher: Sequence[float], lower: Sequence[float]) -> float:
    """Share of (h, l) couples with h > l, ties counting half: the area under the ROC
    curve of scores meant to put `higher` first (Mann-Whitney, from average ranks)."""
    n, m = len(higher), len(lower)
    rank_sum = sum(average_ranks([*higher, *lower])[:n])
    return (rank_sum - n * (n + 1) / 2) / (n * m)


def average_ranks(values: Sequence[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    ranks = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            ranks[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return ranks


def perplexity(
    model: Any,
    tokenizer: Any,
    adapter: str | None,
    texts: Sequence[str],
    max_tokens: int = 512,
    batch_size: int = 8,
) -> float:
    """Perplexity of `texts` (each cut to its first `max_tokens`), over all their tokens
    together, in right-padded batches (a causal model's real tokens never see the
    padding after them). The drift guard takes it several times a round. Batches of 8
    compute about twice as fast as one text at a time on two CPU cores; a batch's
    logits take 8 x its width x the vocabulary's size in floats (at most 0.13 GB for
    the bundled model, whose vocabulary is 8,192 tokens; 0.8 GB for GPT-2's 50,257).
    In bfloat16 where the CPU computes it natively (`precision.measuring`)."""
    import torch

    device = next(model.parameters()).device
    rows = [ids[:max_tokens] for ids in (tokenizer(text)["input_ids"] for text in texts)]
    rows = sorted((ids for ids in rows if len(ids) >= 2), key=len)  # less padding
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start : start + batch_size]
        width = max(len(ids) for ids in chunk)
        ids = torch.zeros((len(chunk), width), dtype=torch.long, device=device)
        mask = torch.zeros_like(ids)
        for row, tokens in enumerate(chunk):
            ids[row, : len(tokens)] = torch.tensor(tokens, device=device)
            mask[row, : len(tokens)] = 1
        with torch.no_grad(), evaluating(model), measuring(model):
            logits = model(
                input_ids=ids,
                attention_mask=mask,
                use_cache=False,
                **adapter_kwargs(model, adapter, len(chunk)),
            ).logits
        losses = torch.nn.functional.cross_entropy(
            logits[:, :-1].float().transpose(1, 2), ids[:, 1:], reduction="none"
        )
        total += float((losses * mask[:, 1:]).sum())
        count += int(mask[:, 1:].sum())
    return math.exp(total / count) if count else float("nan")


def sample_continuations(
    model: Any,
    tokenizer: Any,
    adapter: str | None,
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    seed: int = 0,
    batch_size: int = 64,
    max_prompt_tokens: int = 256,
) -> list[str]:
    """One sampled continuation per prompt with `adapter` on `model` (None: the base
    model); see `sample_each`."""
    return sample_each(
        model,
        tokenizer,
        [adapter],
        prompts,
        params,
        seed=seed,
        batch_size=batch_size,
        max_prompt_tokens=max_prompt_tokens,
    )[0]


def sample_each(
    model: Any,
    tokenizer: Any,
    adapters: Sequence[str | None],
    prompts: Sequence[str],
    params: SamplingParams,
    *,
    seed: int = 0,
    batch_size: int = 64,
    max_prompt_tokens: int = 256,
) -> list[list[str]]:
    """For each of `adapters` on `model` (None: the base model), one sampled
    continuation per prompt, each prompt cut to its last `max_prompt_tokens`, with the
    storyteller's sampling parameters (never beams).

    Written as the storyteller writes: by the batching scheduler, every adapter's rows
    in the same batches (up to `batch_size` rows) through its lean decoding step, each
    row drawing from its own generator, seeded from `seed` and the prompt's place in
    `prompts`. So a prompt's continuation does not depend on the others beside it, the
    adapters draw alike (a gate compares what each writes from the same draws), and
    nothing the caller drew is touched. A prompt asked several times in a row is
    prefilled once for its rows (as best-of-n candidates are). Faster than transformers'
    `generate` on the same model, whose every step goes through the modules' layers (64
    continuations of 64 tokens, bundled model, two CPU cores beside other work: 10 to
    14 s against 25 to 50 s). Blocking (it runs its own event loop): call it in a
    worker thread."""
    import asyncio

    from ..serving.generation import BASE_ADAPTER, GenerationRequest
    from ..serving.modeling import LoadedModel
    from ..serving.scheduler import BatchingGenerator, SchedulerConfig

    if not prompts or not adapters:
        return [[] for _ in adapters]
    device = next(model.parameters()).device
    loaded = LoadedModel(model, tokenizer, "sampling", None, device)
    params = params.replace(num_beams=1)
    # Runs of one prompt, up to 16 rows (a batch holds that many of the longest
    # prompts): row k of the run from prompt i draws with the seed of prompt i + k.
    runs: list[tuple[int, int]] = []  # (first prompt, how many)
    for i, prompt in enumerate(prompts):
        if runs and prompts[runs[-1][0]] == prompt and runs[-1][1] < min(batch_size, 16):
            runs[-1] = (runs[-1][0], runs[-1][1] + 1)
        else:
            runs.append((i, 1))
    encoded = {first: loaded.encode(prompts[first])[-max_prompt_tokens:] for first, _ in runs}

    async def write() -> list[list[str]]:
        generator = BatchingGenerator(loaded, SchedulerConfig(max_batch_size=batch_size))
        try:
            asked = [
                [
                    (
                        n,
                        generator.submit_many(
                            GenerationRequest(
                                encoded[first] or [loaded.eos_token_id],
                                params.replace(seed=seed * 1_000_003 + first),
                                channel=f"{a}-{first}",
                                adapter=adapter or BASE_ADAPTER,
                            ),
                            n,
                        ),
                    )
                    for first, n in runs
                ]
                for a, adapter in enumerate(adapters)
            ]
            out = []
            for groups in asked:
                texts: list[str] = []
                for n, handles in groups:
                    written = [(await handle.result()).text for handle in handles]
                    texts.extend(written if len(written) == n else written[:1] * n)  # greedy
                out.append(texts)
            return out
        finally:
            await generator.close()

    with evaluating(model):
        return asyncio.run(write())


def repetition(texts: Sequence[str]) -> tuple[float, float]:
    """(share of 4-grams that repeat an earlier 4-gram of the same text, distinct-2
    across all texts)."""
    repeated = total4 = 0
    bigrams: list[tuple[str, str]] = []
    for text in texts:
        words = text.lower().split()
        grams = [tuple(words[i : i + 4]) for i in range(len(words) - 3)]
        total4 += len(grams)
        repeated += len(grams) - len(set(grams))
        bigrams.extend(pairwise(words))
    repeat4 = repeated / total4 if total4 else 0.0
    distinct2 = len(set(bigrams)) / len(bigrams) if bigrams else 0.0
    return repeat4, distinct2


def decide(
    config: GateConfig,
    *,
    accuracy: float,
    current_accuracy: float,
    ppl: float,
    current_ppl: float,
    base_ppl: float,
    samples: tuple[Sequence[str], Sequence[str]] | None = None,
    heldout_pairs: int = 0,
    heldout_examples: int = 0,
    current_better: float | None = None,
    base_better: float | None = None,
) -> GateReport:
    """The gate's verdict. The candidate must beat the base model (whose preference
    accuracy is 0.5) and the adapter in service, each unless the held-out feedback
    cannot tell them apart: `base_better` and `current_better` (`current_better_share`
    against the base model's rewards and the served adapter's; None: not measured, and
    the candidate must beat it) under `config.confidence`. The candidate, trained from
    what is served on newer feedback, then goes on: on a few dozen held-out labels the
    comparison is a coin flip, and refusing on it stopped learning where it had begun.
    With the drift guard on, the perplexity bounds hold by construction (it measured
    the same stories with a stricter limit); they bite without it."""
    reasons = []
    if not accuracy > 0.5 and (base_better is None or base_better >= config.confidence):
        measured = ""
        if base_better is not None:
            measured = (
                f" (the base model ranks held-out feedback better in {base_better:.0%} of"
                " resamples of the held-out stories)"
            )
        reasons.append(
            f"preference accuracy {accuracy:.3f} does not beat the base model's 0.500{measured}"
        )
    elif not accuracy > current_accuracy and (
        current_better is None or current_better >= config.confidence
    ):
        measured = ""
        if current_better is not None:
            measured = (
                f" (the adapter in service ranks held-out feedback better in"
                f" {current_better:.0%} of resamples of the held-out stories)"
            )
        reasons.append(
            f"preference accuracy {accuracy:.3f} does not beat {current_accuracy:.3f}{measured}"
        )
    if ppl > current_ppl * (1 + config.max_ppl_increase):
        reasons.append(
            f"perplexity {ppl:.2f} is over {current_ppl:.2f} + {config.max_ppl_increase:.0%}"
        )
    if ppl > base_ppl * (1 + config.max_ppl_vs_base):
        bound = f"{base_ppl:.2f} + {config.max_ppl_vs_base:.0%}"
        reasons.append(f"perplexity {ppl:.2f} drifted past the base model's {bound}")
    rep = cur_rep = dis = cur_dis = None
    if samples is not None:
        rep, dis = repetition(samples[0])
        cur_rep, cur_dis = repetition(samples[1])
        if rep > cur_rep + config.max_repeat4_increase:
            reasons.append(f"repeated 4-grams rose from {cur_rep:.3f} to {rep:.3f}")
        if dis < cur_dis - config.max_distinct2_drop:
            reasons.append(f"distinct-2 fell from {cur_dis:.3f} to {dis:.3f}")
    return GateReport(
        passed=not reasons,
        reasons=tuple(reasons),
        preference_accuracy=accuracy,
        current_preference_accuracy=current_accuracy,
        perplexity=ppl,
        current_perplexity=current_ppl,
        base_perplexity=base_ppl,
        repeat4=rep,
        current_repeat4=cur_rep,
        distinct2=dis,
        current_distinct2=cur_dis,
        heldout_pairs=heldout_pairs,
        heldout_examples=heldout_examples,
        current_better=current_better,
        base_better=base_better,
    )
