"""From feedback in SQLite to training data.

Two kinds of examples, each (prompt exactly as the model saw it, completion):

* preference pairs, for DPO: a companion choice (the chosen continuation over each one
  shown beside it); a retried continuation against its replacement when the
  replacement then scored positive; two continuations of the same prompt whose net
  scores differ by at least a margin;
* labelled examples, for KTO: a continuation with a net positive (desirable) or net
  negative (undesirable) score; zero and ties are left out.

On-policy pairs (`on_policy_pairs`) are more preference data than people gave: of the
candidates written for one turn (best-of-n), the one the reward model scored highest
over the one it scored lowest, when they are far enough apart. They weigh less than
people's pairs and are for training only: the gates judge on people's feedback alone.

A vote is a user's emoji on a generation: the same emoji on two parts of a split reply
counts once (the `votes` view). Votes are weighted so no one dominates: each user's
votes in a round (on the generations between two training rounds) share at most
`per_user_cap` votes of weight, and a user who votes the same way on everything counts
for `uniform_voter_weight`: at least `uniform_voter_min_votes` votes, all one way, which
an honest voter who likes what the rest of the audience likes would cast with a
probability under `uniform_voter_p` (so in a community that dislikes most of what it
sees, a run of 👎 is not suspicious; a run of 👍 is). Lines of users who asked to be
forgotten are never trained on: an example whose prompt holds one is dropped. Only
stories whose community has learning switched on (or that were told outside any
community) are used. Examples of one story stay on one side of the
train/held-out split.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from ..storage import FeedbackRecords

Split = Literal["train", "heldout"]


@dataclass(frozen=True)
class DatasetConfig:
    pair_margin: float = 1.0
    """Two continuations of one prompt make a pair when one scored net positive, the
    other net negative, and their scores differ by at least this much."""
    per_user_cap: int = 20
    """A user's votes in one round together weigh at most this many votes."""
    uniform_voter_min_votes: int = 10
    uniform_voter_p: float = 0.01
    uniform_voter_weight: float = 0.5
    heldout_fraction: float = 0.2
    seed: int = 0
    """Changes which stories are held out."""
    train_after_generation: int = 0
    """Training examples only from generations newer than this id (a round learns from
    what came in since the last promoted round); held-out examples from all."""
    community: str | None = None
    """Only this community's stories (a community's own adapter lineage); None: every
    trainable story (the shared lineage)."""
    on_policy_margin: float = 1.0
    """Best-of-n candidates make an on-policy pair when the reward model's scores of the
    best and the worst differ by more than this (in the reward's units: a difference of
    1 says the first is preferred with probability 0.73)."""
    on_policy_weight: float = 0.5
    """The weight of an on-policy pair; a person's pair weighs 1."""


@dataclass(frozen=True)
class PreferencePair:
    prompt: str
    chosen: str
    rejected: str
    source: Literal["choice", "retry", "score", "reward"]
    story_id: int
    split: Split
    chosen_generation_id: int
    rejected_generation_id: int
    weight: float = 1.0
    """How much the pair counts: a person's choice as stored (1 unless said otherwise),
    an on-policy pair `DatasetConfig.on_policy_weight`."""


@dataclass(frozen=True)
class LabelledExample:
    prompt: str
    completion: str
    label: bool
    score: float
    story_id: int
    split: Split
    generation_id: int


@dataclass
class FeedbackDatasets:
    pairs: list[PreferencePair] = field(default_factory=list)
    examples: list[LabelledExample] = field(default_factory=list)

    def rows(self) -> list[dict[str, Any]]:
        """One JSON-ready dict per example, pairs first."""
        return [{"type": "pair", **asdict(p)} for p in self.pairs] + [
            {"type": "kto", **asdict(e)} for e in self.examples
        ]


def story_split(story_id: int, config: DatasetConfig) -> Split:
    digest = hashlib.sha256(f"{config.seed}:{story_id}".encode()).digest()
    return "heldout" if digest[0] / 256 < config.heldout_fraction else "train"


def _usable(
    generations: dict[int, dict[str, Any]], excluded: dict[int, list[str]], generation_id: int
) -> dict[str, Any] | None:
    g = generations.get(generation_id)
    if g is None or any(line in g["prompt"] for line in excluded.get(g["story_id"], ())):
        return None
    return g


def _pair_split(chosen: dict[str, Any], rejected: dict[str, Any], config: DatasetConfig) -> Split:
    # A pair whose continuations come from two stories (the same opening shown in two
    # channels) is held out when either story is, so no held-out continuation is ever
    # trained on.
    sides = {story_split(chosen["story_id"], config), story_split(rejected["story_id"], config)}
    return "heldout" if "heldout" in sides else "train"


async def build_datasets(
    store: FeedbackRecords, config: DatasetConfig | None = None
) -> FeedbackDatasets:
    config = config or DatasetConfig()
    generations = await store.trainable_generations(config.community)
    excluded = await store.excluded_lines()

    def usable(generation_id: int) -> dict[str, Any] | None:
        return _usable(generations, excluded, generation_id)

    scores = await _net_scores(store, config)
    out = FeedbackDatasets()

    def add_pair(chosen_id: int, rejected_id: int, source: Any, weight: float = 1.0) -> None:
        chosen, rejected = usable(chosen_id), usable(rejected_id)
        if chosen is None or rejected is None or chosen["prompt"] != rejected["prompt"]:
            return
        if chosen["output"] == rejected["output"]:
            return
        split = _pair_split(chosen, rejected, config)
        if split == "train" and max(chosen_id, rejected_id) <= config.train_after_generation:
            return
        out.pairs.append(
            PreferencePair(
                chosen["prompt"],
                chosen["output"],
                rejected["output"],
                source,
                chosen["story_id"],
                split,
                chosen_id,
                rejected_id,
                weight,
            )
        )

    seen: set[tuple[int, int]] = set()
    weights = await store.pair_weights()
    for chosen_id, rejected_id, _, _ in await store.preference_pairs():
        seen.add((chosen_id, rejected_id))
        add_pair(chosen_id, rejected_id, "choice", weights.get((chosen_id, rejected_id), 1.0))

    # A retry whose replacement the audience then liked: the replacement wins.
    for old, new in await store.retried_generations():
        if scores.get(new, 0.0) > 0 and (new, old) not in seen:
            seen.add((new, old))
            add_pair(new, old, "retry")

    # Two continuations of one prompt whose scores differ enough.
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for gid, g in generations.items():
        if gid in scores:
            by_prompt[g["prompt"]].append(gid)
    for ids in by_prompt.values():
        for i, a in enumerate(ids):
            for b in ids[i + 1 :]:
                hi, lo = (a, b) if scores[a] >= scores[b] else (b, a)
                if scores[hi] <= 0 or scores[lo] >= 0 or (hi, lo) in seen:
                    continue
                if scores[hi] - scores[lo] >= config.pair_margin:
                    seen.add((hi, lo))
                    add_pair(hi, lo, "score")

    for gid, score in sorted(scores.items()):
        g = usable(gid)
        if g is None or score == 0:
            continue
        split = story_split(g["story_id"], config)
        if split == "train" and gid <= config.train_after_generation:
            continue
        out.examples.append(
            LabelledExample(
                g["prompt"],
                g["output"],
                score > 0,
                score,
                g["story_id"],
                story_split(g["story_id"], config),
                gid,
            )
        )
    return out


def best_and_worst(
    texts: Sequence[str], scores: Sequence[float], config: DatasetConfig
) -> tuple[int, int] | None:
    """Of one turn's candidates, the indices of the best-scored and the worst-scored
    (the first of equals; empty texts never count), when their scores differ by more
    than `config.on_policy_margin` and their texts differ: the two sides of a pair of
    the reward model's. None when they make no pair."""
    usable = [i for i, text in enumerate(texts) if text.strip()]
    if len(usable) < 2:
        return None
    best = max(usable, key=scores.__getitem__)
    worst = min(usable, key=scores.__getitem__)
    if scores[best] - scores[worst] <= config.on_policy_margin:
        return None
    if texts[best].strip() == texts[worst].strip():
        return None
    return best, worst


async def on_policy_pairs(
    store: FeedbackRecords, config: DatasetConfig | None = None
) -> list[PreferencePair]:
    """Pairs from best-of-n candidate groups (generations sharing `candidate_of`, the id
    of the one shown, each with the reward model's score): the highest scored over the
    lowest, when their scores differ by more than `on_policy_margin`, weighing
    `on_policy_weight`. Consent, forget-me, the story split and the training window
    apply as to people's pairs. Held-out ones are returned (marked so) but are for
    nothing: neither trained on (their stories are held out) nor judged with."""
    config = config or DatasetConfig()
    generations = await store.trainable_generations(config.community, scored_candidates=True)
    excluded = await store.excluded_lines()
    groups: dict[tuple[int, str], list[dict[str, Any]]] = defaultdict(list)
    for gid in sorted(generations):
        g = _usable(generations, excluded, gid)
        if g is not None:
            groups[(g["grp"], g["prompt"])].append(g)
    out = []
    for (_, prompt), members in sorted(groups.items(), key=lambda item: item[0][0]):
        found = best_and_worst(
            [g["output"] for g in members], [g["reward"] for g in members], config
        )
        if found is None:
            continue
        best, worst = members[found[0]], members[found[1]]
        split = _pair_split(best, worst, config)
        if split == "train" and max(best["id"], worst["id"]) <= config.train_after_generation:
            continue
        out.append(
            PreferencePair(
                prompt,
                best["output"],
                worst["output"],
                "reward",
                best["story_id"],
                split,
                best["id"],
                worst["id"],
                config.on_policy_weight,
            )
        )
    return out


async def _net_scores(store: FeedbackRecords, config: DatasetConfig) -> dict[int, float]:
    """Each generation's weighted sum of reaction values."""
    rows = await store.counted_votes()
    # Rounds are the spans of generations between two training rounds' data.
    bounds = await store.round_bounds()
    votes: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for generation_id, user_id, value in rows:
        votes[user_id].append((generation_id, value))
    ups = sum(1 for _, _, value in rows if value > 0)
    scores: dict[int, float] = defaultdict(float)
    for user_votes in votes.values():
        weight = (
            config.uniform_voter_weight if _uniform(user_votes, ups, len(rows), config) else 1.0
        )
        per_round: dict[int, list[tuple[int, float]]] = defaultdict(list)
        for generation_id, value in user_votes:
            per_round[bisect_left(bounds, generation_id)].append((generation_id, value))
        for round_votes in per_round.values():
            capped = weight * min(1.0, config.per_user_cap / len(round_votes))
            for generation_id, value in round_votes:
                scores[generation_id] += value * capped
    return dict(scores)


def _uniform(
    user_votes: list[tuple[int, float]], ups: int, total: int, config: DatasetConfig
) -> bool:
    """Does this user vote the same way on everything, more than an honest voter with
    the rest of the audience's taste plausibly would?"""
    n = len(user_votes)
    own_ups = sum(1 for _, v in user_votes if v > 0)
    if n < config.uniform_voter_min_votes or own_ups not in (0, n):
        return False
    # The others' rate of 👍 (smoothed: with no one else, an even chance).
    rate = (ups - own_ups + 1) / (total - n + 2)
    chance = rate**n if own_ups else (1 - rate) ** n
    return chance < config.uniform_voter_p


MAX_IMPORT_CHARS = 20_000
"""Longest prompt or continuation `import_rows` accepts."""


def parse_import(lines: list[str]) -> list[dict[str, Any]]:
    """Check the JSONL rows `storyengine feedback export` writes (pairs and labelled
    examples) and return them cleaned. Raises `InvalidInput` naming the line and the field
    on the first malformed row, so that nothing is half imported."""
    import json

    from ..errors import InvalidInput
    from ..safety import normalize_text

    rows = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            raise InvalidInput(f"line {number}: not JSON") from None
        if not isinstance(row, dict) or row.get("type") not in ("pair", "kto"):
            raise InvalidInput(f'line {number}: expected an object with "type": "pair" or "kto"')
        texts = (
            ("prompt", "chosen", "rejected") if row["type"] == "pair" else ("prompt", "completion")
        )
        clean: dict[str, Any] = {"type": row["type"]}
        for field_name in texts:
            value = row.get(field_name)
            if not isinstance(value, str) or not value.strip():
                raise InvalidInput(f"line {number}: {field_name!r} must be non-empty text")
            if len(value) > MAX_IMPORT_CHARS:
                raise InvalidInput(
                    f"line {number}: {field_name!r} is longer than {MAX_IMPORT_CHARS:,} characters"
                )
            clean[field_name] = normalize_text(value)
        if row["type"] == "kto" and not isinstance(row.get("label"), bool):
            raise InvalidInput(f"line {number}: 'label' must be true or false")
        clean["label"] = row.get("label")
        source = row.get("source", "import")
        clean["source"] = source if source in ("choice", "retry", "score") else "import"
        group = row.get("story_id", number)
        if isinstance(group, bool) or not isinstance(group, int | str):
            raise InvalidInput(f"line {number}: 'story_id' must be a number or text")
        clean["group"] = str(group)[:100]
        rows.append(clean)
    return rows
