"""A learning round, end to end: feedback → datasets → train → gate → register →
promote or reject. `storyengine train round` runs it in its own process.

A round that runs (once the adapter it starts from has loaded) first trains the reward
model (`reward`) on all the feedback there is, judges it on the held-out side, registers
it and promotes or rejects it; then it trains the adapter, on people's feedback and the
reward model's pairs: the best over the worst of the turns it ranked in service
(`datasets.on_policy_pairs`) and, while people's pairs are few, of continuations the
round samples itself (`sampled_pairs`). The gate judges on people's feedback only. The
reward model's figures are the round's `metrics["reward"]`, and its line is printed
before the round's outcome.

A round that cannot run on the feedback there is (too little of it, none held out to
judge with, KTO examples that are all liked or all disliked, a served adapter missing
on disk) is *skipped* before any model loads: recorded as a finished run whose error is
the reason, in a sentence for a person. So is one whose served adapter does not load on
the base model (known only once that is loaded). Anything else that stops a round is a
failure, recorded with its message.

Crash safety: every step leaves a state the next round starts from. The adapter is
registered only after training and evaluation (files first, then its row; see
`adapters`), and the run notes the version and the newest generation its data came from
as soon as the version is registered, so a crash after the promotion still keeps the
next round from learning the same feedback again; promotion is one transaction; the
database is touched in short transactions. The next round, holding the round lock,
sweeps what a killed one left in the adapter directory and marks its run interrupted.
Killing a round therefore leaves the served adapter and the database as they were, or
with the new version fully promoted. The reward model's registry works the same way
(swept by the next round, holding the same lock); one killed after the reward model's
promotion leaves it promoted, and the next round trains and judges a new one anyway.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any, Literal

from ..config import Settings
from ..options import check_options, option
from ..sampling import SamplingParams
from ..serving.modeling import LoadedModel
from ..storage import FeedbackRecords
from ..text import split_sentences
from .datasets import (
    DatasetConfig,
    FeedbackDatasets,
    LabelledExample,
    PreferencePair,
    build_datasets,
    on_policy_pairs,
)
from .evaluation import (
    GateConfig,
    current_better_share,
    decide,
    heldout_rewards,
    perplexity,
    ranking_accuracy,
    sample_each,
)
from .registry import AdapterRegistry, AdapterVersion
from .reward import (
    FeatureMemo,
    RewardConfig,
    RewardModel,
    RewardRegistry,
    reward_dir,
    reward_skip_reason,
    reward_summary,
    train_reward_model,
    training_split,
)
from .runs import TrainingRun, training_run
from .sampled_pairs import SampledPairsConfig, agreed, prompts_to_sample, sample_pairs
from .training import DriftGuard, TrainConfig, prepare_policy, train_adapter

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundConfig:
    method: Literal["auto", "kto", "dpo"] = option(
        "auto", help="auto: DPO with enough preference pairs, else KTO"
    )
    train: TrainConfig = field(default_factory=TrainConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    data: DatasetConfig = field(default_factory=DatasetConfig)
    drift_guard: float | None = option(
        0.6,
        above=0,
        high=1,
        help="training stops once held-out perplexity has used this share of the room left "
        "under the gate's perplexity bounds, keeping the weights of the last check under it",
    )
    """It measures the held-out stories the gate measures (against the base model and the
    adapter the round started from), so what it lets through the gate's perplexity
    bounds pass too. None: train the whole schedule."""
    guard_retries: int = option(
        2,
        low=0,
        help="when the guard stops training at its first check, train again at half the "
        "learning rate, at most this many times",
    )
    """Late rounds, close to the bounds, take smaller steps."""
    community: str | None = option(
        None,
        flags=("--community",),
        help="train this community's own adapter on its own feedback (default: the shared one)",
    )
    """The lineage this round trains: a community's own (its feedback only, starting
    from what it is served: its own adapter, else the shared one), or None for the
    shared one (all trainable feedback)."""
    reward_pairs: int = option(
        64,
        low=0,
        help="at most this many of the reward model's pairs in a round, the newest "
        "(on-policy and sampled; 0: none)",
    )
    """They bound a round's training time on a busy server, whose best-of-n turns
    make hundreds a round."""
    sampled_pairs: SampledPairsConfig | None = field(default_factory=SampledPairsConfig)
    """While the round has few pairs to train on, more sampled and ranked by the
    lineage's reward model (`sampled_pairs`; None: never)."""
    reward: RewardConfig | None = field(default_factory=RewardConfig)
    """The reward model trained at the start of each round that runs (None: none). It
    learns from all the feedback (not only what came in since the last promoted
    adapter): it is trained afresh each time, and a few hundred examples cost seconds."""

    def __post_init__(self) -> None:
        check_options(self)


@dataclass(frozen=True)
class RoundResult:
    status: Literal["promoted", "rejected", "skipped"]
    reason: str
    version: AdapterVersion | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


GATE_SAMPLES_KEPT = 4
"""Gate samples kept in a version's report, beside its parent's for the same prompts."""


def heldout_stories() -> list[str]:
    """Stories the bundled model never saw (shipped in the package), for perplexity."""
    from importlib import resources

    text = resources.files("storyengine").joinpath("data/heldout_stories.txt").read_text("utf-8")
    return [s.strip() for s in text.split("<|endoftext|>") if s.strip()]


def gate_prompts(
    pairs: list[PreferencePair], examples: list[LabelledExample], stories: list[str], n: int
) -> list[str]:
    """Prompts to sample from for the gate's repetition figures: the held-out feedback's
    prompts (what the audience was shown), topped up with openings of held-out stories."""
    prompts = list(dict.fromkeys([p.prompt for p in pairs] + [e.prompt for e in examples]))
    openings = [" ".join(split_sentences(story)[:2]) for story in stories]
    return (prompts + [o for o in openings if o])[:n]


class PerplexityMemo:
    """Perplexities on the held-out stories measured before in this process, by base
    model and adapter files: the base model's and a served adapter's do not change, and
    each costs a pass over the stories (3.5 s on two CPU cores, twice a round). A model
    or adapter on disk is known by its weights file's path, size and time, so files
    replaced under the same name are measured again."""

    def __init__(self) -> None:
        self._known: dict[tuple[Any, ...], float] = {}

    def get(
        self,
        loaded: LoadedModel,
        adapter: Path | None,
        texts: Sequence[str],
        measure: Callable[[], float],
    ) -> float:
        key = self._key(loaded, adapter, texts)
        if key is None:
            return measure()
        if key not in self._known:
            self._known[key] = measure()
        return self._known[key]

    def remember(
        self, loaded: LoadedModel, adapter: Path, texts: Sequence[str], value: float
    ) -> None:
        key = self._key(loaded, adapter, texts)
        if key is not None:
            self._known[key] = value

    @staticmethod
    def _key(
        loaded: LoadedModel, adapter: Path | None, texts: Sequence[str]
    ) -> tuple[Any, ...] | None:
        weights = weights_key(loaded, adapter)
        return None if weights is None else (*weights, hash(tuple(texts)))


class LogprobMemo:
    """Log-likelihoods of held-out continuations measured before in this process, by
    base model and adapter files (as `PerplexityMemo` knows them): a gate scores the
    held-out feedback under the base model, the candidate and the adapter in service,
    and the base model's never change, while the adapter in service was last round's
    candidate, scored then on much the same feedback. Each table is a dict that
    `evaluation.implicit_rewards` fills in; a few are kept, the least recently used
    dropped, and one that grows past `entries` starts again."""

    def __init__(self, tables: int = 6, entries: int = 50_000) -> None:
        self.tables, self.entries = tables, entries
        self._known: OrderedDict[tuple[Any, ...], dict[tuple[str, str], float]] = OrderedDict()

    def table(self, loaded: LoadedModel, adapter: Path | None) -> dict[tuple[str, str], float]:
        """The log-likelihoods known for the base model (`adapter` None) or the adapter
        saved in `adapter`; a fresh dict, not kept, when its files cannot be known."""
        key = weights_key(loaded, adapter)
        if key is None:
            return {}
        found = self._known.pop(key, None)
        if found is None or len(found) > self.entries:
            found = {}
        self._known[key] = found
        while len(self._known) > self.tables:
            self._known.popitem(last=False)
        return found

    def remember(
        self, loaded: LoadedModel, adapter: Path, logprobs: dict[tuple[str, str], float]
    ) -> None:
        """`logprobs`, measured with the weights since saved in `adapter`."""
        self.table(loaded, adapter).update(logprobs)


def weights_key(loaded: LoadedModel, adapter: Path | None) -> tuple[Any, ...] | None:
    """What identifies the base model (a hub id, or its weights file in a folder) and
    the adapter saved in `adapter`, on this device and dtype; None when the adapter has
    no weights file."""
    base = Path(loaded.model_id)
    model = _weights(base, "model") if base.is_dir() else ()  # else a hub id, or bundled
    files: tuple[Any, ...] = ()
    if adapter is not None:
        files = _weights(adapter, "adapter_model")
        if not files:
            return None
    dtype = str(getattr(loaded.model, "dtype", ""))
    return (loaded.model_id, model, str(loaded.device), dtype, files)


def _weights(directory: Path, stem: str) -> tuple[Any, ...]:
    """What identifies the weights file saved in `directory` (path, size, time); ()
    when there is none."""
    for suffix in (".safetensors", ".bin"):
        found = directory / f"{stem}{suffix}"
        if found.is_file():
            stat = found.stat()
            return (str(found.resolve()), stat.st_size, stat.st_mtime_ns)
    return ()


PERPLEXITIES = PerplexityMemo()
LOGPROBS = LogprobMemo()


def drift_guard(
    policy: Any,
    tokenizer: Any,
    texts: list[str],
    gate: GateConfig,
    share: float,
    *,
    base_ppl: float,
    start_ppl: float,
) -> DriftGuard:
    """A guard that stops training once perplexity on `texts` has used `share` of the
    room left under the gate's bounds: the bound against the base model (`base_ppl`),
    less what earlier rounds have used, and the bound against the adapter training
    starts from (`start_ppl`: the policy's "default" adapter, before training). A
    share of the room *left*, not of the bound: a first round that used 60 % of the
    base model's bound used to leave the next round no room at all (seen: 9.51 against
    a limit of 9.52, every later round skipped), where now each round may go a share
    of the way that remains."""
    base_bound = base_ppl * (1 + gate.max_ppl_vs_base)
    limit = min(
        start_ppl + share * (base_bound - start_ppl),
        start_ppl * (1 + share * gate.max_ppl_increase),
    )
    return DriftGuard(
        lambda: perplexity(policy, tokenizer, "default", texts),
        limit,
        doubling=True,
    )


def pair_rows(pairs: list[PreferencePair]) -> list[dict[str, Any]]:
    """DPO's rows, each with its pair's weight (`training.weighted_rows`)."""
    return [
        {"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected, "weight": p.weight}
        for p in pairs
    ]


def choose_method(
    config: RoundConfig, pairs: list[PreferencePair], labels: list[LabelledExample]
) -> tuple[str, list[dict[str, Any]]]:
    """DPO on the training pairs when asked, or (`auto`) when there are enough of them;
    else KTO on the single labels."""
    method = config.method
    if method == "auto":
        method = "dpo" if len(pairs) >= config.train.min_examples else "kto"
    if method == "dpo":
        return "dpo", pair_rows(pairs)
    return "kto", [
        {"prompt": e.prompt, "completion": e.completion, "label": e.label} for e in labels
    ]


async def run_round(
    settings: Settings, config: RoundConfig, *, say: Callable[[str], None] = print
) -> RoundResult:
    async with training_run(settings) as run:
        return await _run_round(settings, config, run, say)


@dataclass(frozen=True)
class RoundPlan:
    """What a round would train on and judge with, decided before any model loads (the
    reward model's pairs are judged again, and more sampled, once it has loaded:
    `with_reward_pairs`)."""

    method: str
    rows: list[dict[str, Any]]
    heldout_pairs: list[PreferencePair]
    heldout_examples: list[LabelledExample]
    window: tuple[int, int] = (0, 0)
    """The generations whose feedback is new to this lineage: after the first, up to
    the second (generation ids are the one watermark)."""
    people_pairs: list[PreferencePair] = field(default_factory=list)
    """People's training-side pairs."""
    labels: list[LabelledExample] = field(default_factory=list)
    """People's training-side single labels."""
    reward_pairs: list[PreferencePair] = field(default_factory=list)
    """The reward model's training-side pairs (at most `RoundConfig.reward_pairs`)."""
    sample_from: list[tuple[str, int]] = field(default_factory=list)
    """Prompts people were shown, with their stories, that the round may continue to
    sample pairs from (`sampled_pairs`)."""
    sampled: int = 0
    """How many of `reward_pairs` the round sampled itself."""

    @property
    def counts(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "train_rows": len(self.rows),
            "reward_pairs": len(self.reward_pairs) if self.method == "dpo" else 0,
            "sampled_pairs": self.sampled if self.method == "dpo" else 0,
            "heldout_pairs": len(self.heldout_pairs),
            "heldout_examples": len(self.heldout_examples),
        }


async def round_data(store: FeedbackRecords, config: DatasetConfig) -> FeedbackDatasets:
    """What an adapter round learns from and is judged with: people's feedback, and the
    reward model's best-over-worst pairs of the turns it ranked (`on_policy_pairs`),
    those of the training side only (they are never judged with)."""
    data = await build_datasets(store, config)
    data.pairs += [p for p in await on_policy_pairs(store, config) if p.split == "train"]
    return data


def plan_round(
    config: RoundConfig, data: FeedbackDatasets, everything: FeedbackDatasets | None = None
) -> RoundPlan:
    """What a round trains on (`choose_method`: people's pairs and the reward model's,
    or people's labels) and what judges it: people's held-out feedback only, never a
    pair the reward model made. The prompts it may sample pairs from come from
    `everything` (all the feedback, not only what is new to the lineage: continuations
    written now are new whatever the prompt), else from `data`."""
    people = [p for p in data.pairs if p.source != "reward"]
    made = [p for p in data.pairs if p.source == "reward" and p.split == "train"]
    sampling = config.sampled_pairs
    plan = RoundPlan(
        "",
        [],
        [p for p in people if p.split == "heldout"][: config.gate.max_examples],
        [e for e in data.examples if e.split == "heldout"][: config.gate.max_examples],
        people_pairs=[p for p in people if p.split == "train"],
        labels=[e for e in data.examples if e.split == "train"],
        sample_from=prompts_to_sample(everything or data, sampling.prompts) if sampling else [],
    )
    return with_reward_pairs(config, plan, made)


def with_reward_pairs(
    config: RoundConfig,
    plan: RoundPlan,
    served: list[PreferencePair],
    sampled: Sequence[PreferencePair] = (),
) -> RoundPlan:
    """The plan with these as the reward model's pairs: those of turns it ranked in
    service (`served`), then those the round sampled itself, the newest
    `config.reward_pairs` of them; its method and rows chosen again (an `auto` round
    on single labels switches to DPO once the pairs are enough, and back when they are
    no longer)."""
    served = sorted(served, key=lambda p: max(p.chosen_generation_id, p.rejected_generation_id))
    everything = served + list(sampled)
    kept = everything[-config.reward_pairs :] if config.reward_pairs else []
    mine = min(len(sampled), len(kept))
    method, rows = choose_method(config, plan.people_pairs + kept, plan.labels)
    return replace(plan, method=method, rows=rows, reward_pairs=kept, sampled=mine)


def wants_sampled(config: RoundConfig, plan: RoundPlan, settings: Settings) -> bool:
    """Whether the round samples pairs of its own: it may train DPO (`method` auto or
    dpo), the storyteller samples (greedy decoding writes one text n times), there
    are prompts to continue, and fewer pairs than `while_pairs_below`."""
    sampling = config.sampled_pairs
    pairs = len(plan.people_pairs) + len(plan.reward_pairs)
    return (
        sampling is not None
        and config.method != "kto"
        and config.reward_pairs > 0
        and not settings.sampling.greedy
        and bool(plan.sample_from)
        and pairs < sampling.while_pairs_below
    )


def skip_reason(config: RoundConfig, plan: RoundPlan) -> str | None:
    """Why this feedback cannot make a round yet, as a sentence for a person; None when
    it can. Everything here is known before a model loads, so a round that cannot run
    costs nothing."""
    n, need = len(plan.rows), config.train.min_examples
    held = len(plan.heldout_pairs) + len(plan.heldout_examples)
    if plan.method == "dpo" and n < need:  # asked for: `auto` picks DPO only with enough
        return (
            f"not enough feedback yet for DPO: {n} preference pairs (a round needs {need}),"
            f" {held} held out; pairs come from companion choices, retries and"
            " continuations of one opening rated apart (`--method auto` trains KTO on"
            " single reactions meanwhile)"
        )
    if n < need:
        return (
            f"not enough feedback yet: {n} training examples (a round needs {need}),"
            f" {held} held out"
        )
    if plan.method == "kto":
        liked = sum(1 for row in plan.rows if row["label"])
        if liked in (0, n):
            side, other = ("liked (👍)", "👎") if liked else ("disliked (👎)", "👍")
            return (
                f"all {n} rated continuations to learn from are {side}: the storyteller"
                " learns from the difference between liked and disliked continuations;"
                f" wait for some {other} or companion choices"
            )
    if not held:
        return (
            f"no held-out feedback yet to judge a new adapter on: {n} training examples,"
            " none held out (the gate judges on the feedback of stories kept out of"
            f" training, {config.data.heldout_fraction:.0%} of them)"
        )
    return None


async def _run_round(
    settings: Settings, config: RoundConfig, run: TrainingRun, say: Callable[[str], None]
) -> RoundResult:
    store, registry = run.store, run.registry
    rewards = await RewardRegistry(store, reward_dir(settings), lock_dir=settings.adapter_dir).open(
        locked=True
    )
    trained_until, run.data_until = await store.data_window(config.community)
    data_config = replace(
        config.data, train_after_generation=trained_until, community=config.community
    )
    data = await round_data(store, data_config)
    # The reward model learns from all the feedback there is, through the same
    # consent, forget-me and caps; it may train when the adapter cannot yet.
    all_data = await build_datasets(store, replace(data_config, train_after_generation=0))
    plan = replace(plan_round(config, data, all_data), window=(trained_until, run.data_until))
    # A community's first round starts from the shared adapter it has been served.
    current = await registry.serving(config.community)
    reason = skip_reason(config, plan) or missing_adapter(current)
    reward_reason = reward_skip_reason(config.reward, all_data) if config.reward is not None else ""
    await run.begin(plan.method, config.community)
    if reason is not None and (config.reward is None or reward_reason is not None):
        run.end(error=reason)
        return RoundResult("skipped", reason)
    if reason is not None:  # only the reward model: it reads the bare base model
        from ..serving.modeling import load_for_training

        assert config.reward is not None
        loaded = await asyncio.to_thread(load_for_training, settings)
        reward = await train_reward_model(
            rewards, loaded, all_data, config.reward, community=config.community
        )
        say(reward_summary(reward))
        run.end(error=reason)
        return RoundResult("skipped", reason, metrics={"reward": reward})

    reward: dict[str, Any] = {}

    async def reward_step(loaded: LoadedModel) -> tuple[RewardModel | None, list[PreferencePair]]:
        """Train and judge the lineage's reward model. Then, if the lineage has one in
        service (its own, else the shared one) and the round has use for it, fit a
        judge like it on the training side only (`sampled_pairs`): the served turns'
        pairs it agrees with, and the judge itself to rank sampled ones."""
        memo: FeatureMemo = {}  # the base model's features: the judge reads the same texts
        if config.reward is not None and reward_reason is not None:
            reward.update(status="skipped", reason=reward_reason)
        elif config.reward is not None:
            reward.update(
                await train_reward_model(
                    rewards, loaded, all_data, config.reward, community=config.community, memo=memo
                )
            )
        wanted = bool(plan.reward_pairs) or wants_sampled(config, plan, settings)
        if config.reward is None or not wanted or await rewards.serving(config.community) is None:
            return None, []
        pairs, labels = training_split(all_data, config.reward)
        if len(pairs) + len(labels) < config.reward.min_train:
            return None, []
        judge = await asyncio.to_thread(
            partial(RewardModel.fit, memo=memo), loaded, pairs, labels, config.reward
        )
        kept = await asyncio.to_thread(agreed, judge, plan.reward_pairs, config.data)
        return judge, kept

    result = await _train_and_gate(
        settings, config, registry, plan, current, run.registered, say, reward_step
    )
    if reward:
        say(reward_summary(reward))
        result = replace(result, metrics={**result.metrics, "reward": reward})
    run.end(version=result.version.version if result.version else None, error=result.reason or None)
    return result


def missing_adapter(current: AdapterVersion | None) -> str | None:
    """Why a round cannot start from the served adapter: its files are gone."""
    if current is None or (current.path / "adapter_config.json").is_file():
        return None
    return (
        f"the served adapter {current.name} is missing on disk ({current.path}): restore"
        " it, or go back to the one before with `storyengine adapters rollback`"
    )


def unloadable_adapter(current: AdapterVersion, model_id: str, exc: Exception) -> str:
    """Why a round cannot start from the served adapter: it does not load on the base
    model (trained on another one, or its files are damaged)."""
    detail = " ".join(str(exc).split()) or type(exc).__name__
    if len(detail) > 160:
        detail = detail[:159] + "…"
    return (
        f"the served adapter {current.name} does not load on the base model {model_id}"
        f" ({detail}): serve another (`storyengine adapters rollback`), or set"
        " STORY_BASE_MODEL back to the model it was trained on"
    )


async def _sample(
    settings: Settings,
    config: RoundConfig,
    plan: RoundPlan,
    policy: Any,
    loaded: LoadedModel,
    judge: RewardModel,
    seed: int,
    say: Callable[[str], None],
) -> list[PreferencePair]:
    """The round's own pairs (`sampled_pairs.sample_pairs`), with the storyteller's
    sampling parameters, prompt room and polish; none, said, if sampling fails (the
    round goes on with the pairs it has)."""
    from ..safety import SafetyFilter

    sampling = config.sampled_pairs
    assert sampling is not None
    say(
        f"sampling {sampling.candidates} continuations of {len(plan.sample_from)} prompts"
        " for the reward model to rank into pairs"
    )
    tok = loaded.tokenizer
    safety = SafetyFilter(blocklist=settings.blocklist, special_tokens=loaded.special_tokens)
    try:
        made = await asyncio.to_thread(
            sample_pairs,
            policy,
            tok,
            "default",  # the adapter the round starts from (a fresh LoRA: the base model)
            judge,
            plan.sample_from,
            sampling,
            settings.sampling,
            config.data,
            polish=safety.polish,
            max_prompt_tokens=max(1, loaded.context_window - sampling.max_new_tokens),
            seed=seed,
        )
    except Exception as exc:  # the round's own extra: never worth the round
        log.exception("sampling pairs failed")
        say(f"no pairs sampled ({type(exc).__name__}: {exc}); training on the pairs there are")
        return []
    say(f"{len(made)} sampled pairs scored far enough apart to learn from")
    return made


async def _train_and_gate(
    settings: Settings,
    config: RoundConfig,
    registry: AdapterRegistry,
    plan: RoundPlan,
    current: AdapterVersion | None,
    registered: Callable[[int, str], Awaitable[None]],
    say: Callable[[str], None],
    reward_step: Callable[[LoadedModel], Awaitable[tuple[RewardModel | None, list[PreferencePair]]]]
    | None = None,
) -> RoundResult:
    from ..serving.modeling import load_for_training

    texts = heldout_stories()  # perplexity: the drift guard's and the gate's
    loaded = await asyncio.to_thread(load_for_training, settings)
    judge, served = None, []
    if reward_step is not None:  # on the bare base model, before LoRA layers go in
        judge, served = await reward_step(loaded)
    # The reward model's pairs of served turns, as the judge sees them (none without).
    plan = with_reward_pairs(config, plan, served)
    train = replace(config.train, method=plan.method).resolved()  # type: ignore[arg-type]
    try:
        policy = prepare_policy(loaded.model, current.path if current else None, train)
    except (OSError, ValueError, RuntimeError) as exc:
        if current is None:  # a fresh LoRA that does not fit: a bug, not the user's
            raise
        return RoundResult("skipped", unloadable_adapter(current, loaded.model_id, exc))
    tok = loaded.tokenizer
    if judge is not None and wants_sampled(config, plan, settings):
        sampled = await _sample(settings, config, plan, policy, loaded, judge, train.seed, say)
        plan = with_reward_pairs(config, plan, served, sampled)
        train = replace(config.train, method=plan.method).resolved()  # type: ignore[arg-type]
    reason = skip_reason(config, plan)
    if reason is not None:  # the reward model's pairs, judged, are fewer than planned
        return RoundResult("skipped", reason)
    method, rows = plan.method, plan.rows
    heldout_pairs, heldout_examples = plan.heldout_pairs, plan.heldout_examples

    def start_perplexities() -> tuple[float, float]:
        """The base model's and the adapter's the round starts from (the one in service:
        the gate's reference, whose weights these are; a fresh LoRA is the base model)."""
        base = PERPLEXITIES.get(loaded, None, texts, lambda: perplexity(policy, tok, None, texts))
        if current is None:
            return base, base
        return base, PERPLEXITIES.get(
            loaded, current.path, texts, lambda: perplexity(policy, tok, "default", texts)
        )

    base_ppl, start_ppl = await asyncio.to_thread(start_perplexities)
    guard = None
    if config.drift_guard:
        guard = drift_guard(
            policy,
            tok,
            texts,
            config.gate,
            config.drift_guard,
            base_ppl=base_ppl,
            start_ppl=start_ppl,
        )
    made = plan.counts["reward_pairs"]
    say(
        f"training {method} on {len(rows)} examples"
        + (f" ({made} of them the reward model's pairs)" if made else "")
        + f" (lr {train.learning_rate:g}, {train.epochs:g} epochs), starting from "
        + (current.name if current else "a fresh adapter")
        + (f"; stops if held-out perplexity passes {guard.limit:.2f}" if guard else "")
    )
    for retry in range(config.guard_retries + 1):
        figures = await asyncio.to_thread(
            train_adapter, policy, tok, rows, train, progress=say, guard=guard
        )
        if guard is None or guard.stopped_at != 0 or retry == config.guard_retries:
            break
        # The first steps already went too far: smaller ones may still fit.
        train = replace(train, learning_rate=(train.learning_rate or 0.0) / 2)  # resolved
        first = guard.checks[0][0]
        guard = replace(guard, checks=[], stopped_at=None)
        steps = "step" if first == 1 else f"{first} steps"
        say(f"the first {steps} went past the limit; training again at lr {train.learning_rate:g}")
    if guard is not None and guard.stopped_at == 0:
        return RoundResult(
            "skipped",
            "no room left under the perplexity bounds: the drift guard stopped training "
            f"at its first check (held-out perplexity {guard.checks[-1][1]:.2f}, "
            f"limit {guard.limit:.2f})",
        )
    stopped = ""
    if guard is not None and guard.stopped_at is not None:
        stopped = f", stopped by the drift guard: kept step {guard.stopped_at}"
    say(
        f"trained in {figures['seconds']:.0f} s (loss {figures['train_loss']:.3f}{stopped}); "
        "evaluating"
    )
    reference = None
    if current is not None:  # the adapter being served, to compare against
        policy.load_adapter(str(current.path), adapter_name="current")
        reference = "current"

    candidate_logprobs: dict[tuple[str, str], float] = {}

    def evaluate() -> dict[str, Any]:
        base = LOGPROBS.table(loaded, None)  # the base model's: measured once a process
        served = LOGPROBS.table(loaded, current.path) if current is not None else None
        held = (heldout_pairs, heldout_examples)
        mine = heldout_rewards(policy, tok, "default", *held, base, candidate_logprobs)
        theirs = heldout_rewards(policy, tok, reference, *held, base, served)
        zero = heldout_rewards(policy, tok, None, *held)  # the base model's: 0 everywhere

        def better(rewards: dict[tuple[str, str], float]) -> float | None:
            resamples = config.gate.resamples
            return current_better_share(mine, rewards, *held, resamples=resamples, seed=train.seed)

        base_better = better(zero)
        return {
            "accuracy": ranking_accuracy(mine, *held),
            "current_accuracy": ranking_accuracy(theirs, *held),
            "current_better": base_better if reference is None else better(theirs),
            "base_better": base_better,
            # the guard measured the weights training ended with on these texts
            "ppl": guard.kept_value
            if guard is not None and guard.kept_value is not None
            else perplexity(policy, tok, "default", texts),
            "current_ppl": start_ppl,
            "base_ppl": base_ppl,
        }

    scores = await asyncio.to_thread(evaluate)
    samples = None
    if config.gate.samples:
        say(f"sampling {config.gate.samples} continuations from each adapter")
        prompts = gate_prompts(heldout_pairs, heldout_examples, texts, config.gate.samples)
        params = SamplingParams(max_new_tokens=config.gate.sample_tokens)

        this, parent = await asyncio.to_thread(
            sample_each, policy, tok, ["default", reference], prompts, params, seed=train.seed
        )
        samples = (this, parent)
    report = decide(
        config.gate,
        accuracy=scores["accuracy"],
        current_accuracy=scores["current_accuracy"],
        ppl=scores["ppl"],
        current_ppl=scores["current_ppl"],
        base_ppl=scores["base_ppl"],
        samples=samples,
        heldout_pairs=len(heldout_pairs),
        heldout_examples=len(heldout_examples),
        current_better=scores["current_better"],
        base_better=scores["base_better"],
    )
    metrics = {**report.to_dict(), "train": figures}
    if samples is not None:  # what it writes beside what its parent wrote, same seeds
        metrics["samples"] = [
            {"prompt": prompt, "this": this, "parent": parent}
            for prompt, this, parent in list(zip(prompts, *samples, strict=True))[
                :GATE_SAMPLES_KEPT
            ]
        ]
    policy.set_adapter("default")
    version = await registry.register(
        lambda d: policy.save_pretrained(str(d), selected_adapters=["default"]),
        method=method,
        parent_version=current.version if current else None,
        metrics=json.loads(json.dumps(metrics, default=str)),
        data_counts=plan.counts,
        community=config.community,
        recipe={
            "round": asdict(config),
            "train": asdict(train),
            "base_model": settings.base_model,
            "data_window": {"after_generation": plan.window[0], "until": plan.window[1]},
        },
    )
    await registered(version.version, method)
    PERPLEXITIES.remember(loaded, version.path, texts, scores["ppl"])
    LOGPROBS.remember(loaded, version.path, candidate_logprobs)
    if report.passed:
        version = await registry.promote(version.version)
        return RoundResult("promoted", "", version, metrics)
    await registry.reject(version.version)
    return RoundResult(
        "rejected", "; ".join(report.reasons), await registry.get(version.version), metrics
    )
